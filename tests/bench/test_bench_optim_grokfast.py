"""`cognate bench grokfast`: the task, the batched model against the reference module, and the summary."""

import json

import pytest
import torch

from cognate.bench.grokfast import (
    PRIME,
    Recipe,
    ReferenceDecoder,
    batched_logits,
    median_steps,
    modular_multiplication_data,
    speedup,
    summarize,
)
from cognate.cli import main


@pytest.fixture(autouse=True)
def restore_threads():
    """`--threads 1` sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_dataset_is_every_product_mod_97():
    data = modular_multiplication_data()
    assert data.shape == (9312, 5)
    x, op, y, eq, answer = data.T
    assert torch.equal(answer, x * y % PRIME)
    assert x.min() == 0 and x.max() == 96 and y.min() == 1 and y.max() == 96
    assert (op == PRIME + 1).all() and (eq == PRIME).all()
    assert len({(a, b) for a, b in zip(x.tolist(), y.tolist())}) == 9312


def test_batched_runs_compute_what_the_reference_module_computes():
    recipe = Recipe()
    torch.manual_seed(0)
    models = [ReferenceDecoder(recipe) for _ in range(3)]  # three different initializations
    states = [m.state_dict() for m in models]
    weights = {name: torch.stack([s[name] for s in states]) for name in states[0]}
    tokens = modular_multiplication_data()[:64, :4]
    batched = batched_logits(weights, tokens, recipe)
    for i, model in enumerate(models):
        torch.testing.assert_close(batched[i], model(tokens), rtol=1e-4, atol=1e-5)


def test_median_counts_a_run_that_never_arrived_as_slowest():
    assert median_steps([900, None, 800]) == 900
    assert median_steps([None, 800]) is None  # the upper middle value: no better than half the seeds
    assert median_steps([700]) == 700


def test_speedup_is_a_lower_bound_when_the_baseline_hit_the_cap():
    assert speedup(39_890, 910, step_cap=50_000) == (43.84, False)
    assert speedup(None, 1_000, step_cap=12_000) == (12.0, True)
    assert speedup(None, None, step_cap=12_000) == (None, False)


def test_summary_uses_both_baselines():
    per_seed = [{"seed": 0, "steps_to_95": {"baseline": None, "baseline_wd": 4000, "ema": 1000, "ma": 800}}]
    result = summarize(per_seed, step_cap=10_000)
    assert result["speedup_ema"] == 10.0 and result["speedup_is_lower_bound"] is True
    assert result["speedup_ma_vs_wd"] == 5.0 and result["speedup_vs_wd_is_lower_bound"] is False


@pytest.mark.slow
def test_command_prints_one_json_line(capsys):
    assert main(["bench", "grokfast", "--json", "--cap", "10", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result["steps_to_95"]) == {"baseline", "baseline_wd", "ema", "ma"}
    assert result["step_cap"] == 10 and result["speedup_ema"] is None  # nothing groks in one epoch
    assert all(0.0 <= acc <= 1.0 for acc in result["per_seed"][0]["last_val_accuracy"].values())
