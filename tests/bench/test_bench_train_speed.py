"""`cognate bench train`: one JSON line with the figures the speed issue asks for, and honest FLOP accounting."""

import json

import pytest

from cognate.bench.train_speed import DEFAULT_BASELINE, load_baseline
from cognate.cli import main
from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train.throughput import flops_per_token


def test_the_baseline_is_plain_pytorch_without_cognate_code():
    source = DEFAULT_BASELINE.read_text()
    assert "import cognate" not in source and "from cognate" not in source
    plain = load_baseline(DEFAULT_BASELINE)
    model = plain.PlainGPT(plain.PlainConfig())
    # nanoGPT layout at the cognate-25m dimensions: d 216, 11 layers, 4x MLP, untied 32000-token head.
    assert model.lm_head.weight.shape == (32_000, 216) and len(model.blocks) == 11


def test_command_prints_the_figures_as_one_json_line(capsys):
    assert (
        main(
            [
                "bench",
                "train",
                "--json",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--batch-size",
                "1",
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip())
    for key in ("bf16_peak_flops", "baseline_tokens_per_s", "t1_tokens_per_s", "default_tokens_per_s"):
        assert report[key] > 0
    assert report["speedup_t1"] == pytest.approx(report["t1_tokens_per_s"] / report["baseline_tokens_per_s"])
    # The baseline runs as nanoGPT's users run it on a CPU (fp32); Cognate's arms in the precision it chose.
    chosen = report["precision"]["precision"]
    assert report["baseline_precision"] == "fp32"
    assert (
        report["baseline_chosen_precision"] == report["t1_precision"] == report["default_precision"] == chosen
    )
    # MFU against the peak of the precision each arm used.
    for arm in ("baseline", "t1"):
        peak = report[f"{report[f'{arm}_precision']}_peak_flops"]
        expected = report[f"{arm}_tokens_per_s"] * report[f"{arm}_flops_per_token"] / peak
        assert report[f"mfu_{arm}"] == pytest.approx(expected)
    # The default model really runs t_train steps, so its FLOPs per token exceed one step's.
    assert report["default_flops_per_token"] > 2 * report["t1_flops_per_token"]
    # The recursion's price: the parts' FLOPs add up to the whole, and every part that runs has a time.
    breakdown = report["default_breakdown"]
    assert set(breakdown) == {"grad_step_blocks", "no_grad_step_blocks", "halting", "memory", "lm_head"}
    assert sum(p["flops_per_token"] for p in breakdown.values()) == pytest.approx(
        report["default_flops_per_token"]
    )
    assert breakdown["memory"]["flops_per_token"] > 0  # memory runs at every length, 32 tokens too
    assert breakdown["lm_head"]["seconds_per_token"] > 0


def test_flops_count_the_steps_and_parts_that_really_run():
    preset = get_preset("tiny")
    one_step = CognateModel(preset.replace(t_train=1, grad_steps=1, act_enabled=False, mem_enabled=False))
    cfg = one_step.cfg
    per_layer = 4 * cfg.d_model**2 + 3 * cfg.d_model * cfg.ffn_hidden
    attention = 2 * 2 * cfg.n_layers * cfg.d_model * 256 / 2
    forward = 2 * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model) + attention
    assert flops_per_token(one_step, 256) == 3 * forward

    # Steps 1..t_infer and the last grad_steps are supervised (3x a forward with the head); step 2 of 3 runs under
    # no_grad and costs one forward of the core.
    steps = dict(t_train=3, t_infer=1, grad_steps=1, act_enabled=False)
    recursive = CognateModel(preset.replace(**steps, mem_enabled=False))
    short = 511
    core = 2 * cfg.n_layers * per_layer + 2 * 2 * cfg.n_layers * cfg.d_model * short / 2
    head = 2 * cfg.vocab_size * cfg.d_model
    assert flops_per_token(recursive, short) == pytest.approx(3 * 2 * (core + head) + core)
    deeper_answers = CognateModel(recursive.cfg.replace(t_infer=2))
    assert flops_per_token(deeper_answers, short) == pytest.approx(3 * 3 * (core + head))
    # With memory: its projections run on every step, no_grad ones too; the head still runs only on the supervised
    # steps (the memory's surprise needs none).
    with_memory = CognateModel(preset.replace(**steps))
    memory = flops_per_token(with_memory, short) - flops_per_token(recursive, short)
    assert 0 < memory < head
