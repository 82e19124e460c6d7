"""`bf16: auto`: bf16 autocast only where this machine's bf16 matmuls are measured faster than fp32."""

import argparse
import json

import pytest

from cognate.model.config import ConfigError
from cognate.train import precision as precision_module
from cognate.train.config import TrainConfig
from cognate.train.precision import (
    BF16_MIN_SPEEDUP,
    add_bf16_argument,
    choose_bf16,
    resolve_precision,
)

AMX_LIKE = (0.87e12, 0.20e12)  # bf16 4x faster (a Xeon with AMX)
NO_AMX = (0.17e12, 0.33e12)  # bf16 half the speed (the same family without AMX)


def test_auto_takes_bf16_only_where_it_is_clearly_faster():
    assert choose_bf16("auto", *AMX_LIKE) is True
    assert choose_bf16("auto", *NO_AMX) is False
    # A small matmul advantage does not pay for autocast's casts.
    assert choose_bf16("auto", 1.1e12, 1.0e12) is False
    assert choose_bf16("auto", BF16_MIN_SPEEDUP * 1e12, 1e12) is True


@pytest.mark.parametrize("peaks", [AMX_LIKE, NO_AMX])
def test_an_explicit_setting_wins_over_the_measurement(peaks):
    assert choose_bf16(True, *peaks) is True
    assert choose_bf16(False, *peaks) is False


@pytest.mark.parametrize(("peaks", "expected"), [(AMX_LIKE, "bf16"), (NO_AMX, "fp32")])
def test_resolve_measures_both_peaks_and_reports_the_one_in_use(monkeypatch, peaks, expected):
    by_dtype = {"torch.bfloat16": peaks[0], "torch.float32": peaks[1]}
    monkeypatch.setattr(precision_module, "measure_matmul_flops", lambda dtype, device: by_dtype[str(dtype)])
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == expected
    assert chosen.peak_flops == (peaks[0] if expected == "bf16" else peaks[1])
    line = chosen.describe()
    assert expected in line and "auto" in line and f"{peaks[0] / 1e12:.3f}" in line
    assert json.loads(json.dumps(chosen.to_dict()))["precision"] == expected


def test_trainer_setting_is_validated_and_defaults_to_auto():
    assert TrainConfig().bf16 == "auto"
    assert TrainConfig(bf16=False).bf16 is False
    with pytest.raises(ConfigError, match="bf16='fast' must be true, false or auto"):
        TrainConfig(bf16="fast")


def test_command_line_flag():
    parser = argparse.ArgumentParser()
    add_bf16_argument(parser)
    assert parser.parse_args([]).bf16 == "auto"
    assert parser.parse_args(["--bf16"]).bf16 is True
    assert parser.parse_args(["--bf16", "false"]).bf16 is False
    assert parser.parse_args(["--bf16", "auto"]).bf16 == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--bf16", "maybe"])
