"""The trainer's pure parts: schedule, config validation and overrides, atomic checkpoints, metrics log."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cognate.model.config import ConfigError
from cognate.train import checkpoint
from cognate.train.config import TrainConfig, parse_overrides, split_overrides
from cognate.train.metrics import MetricsLog, truncate_after_step
from cognate.train.schedule import lr_multiplier


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    warmup, total, floor = 1000, 11_000, 0.1
    assert lr_multiplier(0, warmup, total, floor) == pytest.approx(1 / 1001)
    assert lr_multiplier(499, warmup, total, floor) == pytest.approx(500 / 1001)
    assert lr_multiplier(warmup, warmup, total, floor) == pytest.approx(1.0)
    assert lr_multiplier(warmup + 5000, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_multiplier(total, warmup, total, floor) == pytest.approx(floor)
    assert lr_multiplier(10 * total, warmup, total, floor) == pytest.approx(floor)


@given(st.integers(0, 10**7), st.integers(0, 10**5), st.integers(1, 10**7), st.floats(0, 1))
def test_schedule_stays_within_floor_and_one(tokens, warmup, extra, floor):
    value = lr_multiplier(tokens, warmup, warmup + extra, floor)
    assert min(floor, 1 / (warmup + 1)) - 1e-12 <= value <= 1.0 + 1e-12


def test_schedule_is_monotone_after_warmup():
    values = [lr_multiplier(t, 100, 10_000, 0.0) for t in range(100, 10_001, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_train_config_names_every_bad_field():
    with pytest.raises(ConfigError) as error:
        TrainConfig(batch_size=0, optimizer="sgd", warmup_tokens=10, max_tokens=5)
    message = str(error.value)
    assert "batch_size=0" in message and "optimizer='sgd'" in message and "warmup_tokens=10" in message


def test_overrides_parse_yaml_scalars_and_route_to_model_or_training():
    values = parse_overrides(["lr=3e-4", "t_train=6", "bf16=false", "attn_window=null"])
    model, train = split_overrides(values, {"t_train", "attn_window"})
    assert model == {"t_train": 6, "attn_window": None}
    assert train == {"lr": 3e-4, "bf16": False}
    with pytest.raises(ConfigError, match="unknown config keys: nope"):
        split_overrides({"nope": 1}, {"t_train"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_checkpoint_round_trips_tensors_and_plain_values(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 3)},
        "progress": {"step": 7, "best": math.inf},
        "rng": torch.get_rng_state(),
    }
    checkpoint.save_atomic(state, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(tmp_path / "ckpt.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["progress"] == state["progress"]
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no temporary file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_is_renamed_into_place_from_a_hidden_file_beside_it(tmp_path, monkeypatch):
    # The rename is atomic only within one file system, so the temporary file must sit in the target's folder
    # (created with its parents), hidden and named after the checkpoint so that no glob of checkpoints sees it.
    renames = []
    original = checkpoint.os.replace

    def replace(source, target):
        renames.append((Path(source), Path(target), checkpoint.load(source)))
        original(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = tmp_path / "run" / "nested" / "ckpt.pt"
    checkpoint.save_atomic({"step": 3}, path)
    [(source, target, saved)] = renames
    assert target == path and source.parent == path.parent and saved == {"step": 3}
    assert source.name.startswith(".ckpt.pt.") and source.name.endswith(".tmp")
    assert checkpoint.load(path) == {"step": 3} and not source.exists()


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"obj": ConfigError("x")}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        checkpoint.load(tmp_path / "evil.pt")


def test_metrics_log_drops_rows_past_the_resumed_step_and_plots(tmp_path):
    log = MetricsLog(tmp_path, total_steps=10, config={}, progress=False)
    for step in range(1, 6):
        log.log({"step": step, "tokens": 100 * step, "loss": 5.0 - step / 10, "lr": 1e-3})
    log.close()
    assert (tmp_path / "curves.png").stat().st_size > 0
    resumed = MetricsLog(tmp_path, total_steps=10, config={}, resume_step=3, progress=False)
    resumed.log({"step": 4, "tokens": 400, "loss": 1.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 1.0


def test_a_resumed_run_drops_log_rows_written_after_its_checkpoint(tmp_path):
    log = tmp_path / "samples.jsonl"
    log.write_text("".join(json.dumps({"step": step, "completion": "x"}) + "\n" for step in (10, 20, 30)))
    assert [row["step"] for row in truncate_after_step(log, 20)] == [10, 20]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [10, 20]


def test_a_torn_last_log_line_is_dropped_and_a_malformed_middle_line_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2))
    log.write_text(whole + '{"step": 3, "lo')  # killed in the middle of writing step 3
    assert [row["step"] for row in truncate_after_step(log, 5)] == [1, 2]
    assert log.read_text() == whole
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        truncate_after_step(log, 5)


def test_stale_checkpoint_temporaries_are_removed(tmp_path):
    checkpoint.save_atomic({"x": torch.ones(1)}, tmp_path / "checkpoint.pt")
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert checkpoint.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_test_mode_gives_defaults_that_explicit_settings_override():
    from argparse import Namespace

    from cognate.train.commands import resolve_configs
    from cognate.train.config import TEST_OVERRIDES

    args = Namespace(preset="tiny", model=None, config=None, overrides=["grad_accum=4"], test=True)
    _, train = resolve_configs(args)
    assert train.grad_accum == 4  # what the user set
    assert train.max_steps == TEST_OVERRIDES["max_steps"]  # what --test sets when the user did not
