"""Halting-threshold calibration: the rule a user gets is the cheapest one whose measured loss cost is in budget."""

import contextlib
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train import trainer
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed
from cognate.train.halting import THRESHOLD_GRID, calibrate_halting, smallest_within_budget

pytestmark = pytest.mark.usefixtures("offline_one_thread")


@given(
    deltas=st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=25),
    budget=st.floats(-1.0, 1.0, allow_nan=False),
)
def test_bisection_finds_the_first_grid_point_within_budget_of_a_falling_delta(deltas, budget):
    falling = sorted(deltas, reverse=True)
    grid = [float(i) for i in range(len(falling))]
    calls = []

    def delta(value: float) -> float:
        calls.append(value)
        return falling[int(value)]

    index = smallest_within_budget(grid, delta, budget)
    within = [i for i, d in enumerate(falling) if d <= budget]
    assert index == (within[0] if within else len(grid) - 1)
    assert len(calls) <= len(grid).bit_length() + 1


def _model_and_data(builtin_data, seed: int):
    vocab = json.loads((builtin_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    cfg = get_preset("tiny").replace(
        vocab_size=vocab, d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, mem_dim=16, mem_chunk_size=32
    )
    torch.manual_seed(seed)
    model = CognateModel(cfg)
    with (
        torch.no_grad()
    ):  # a halting head whose q spreads over (0, 1), so thresholds differ in what they halt
        model.halting.out.weight.normal_(std=3.0)
        model.halting.out.bias.zero_()
    dist = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    return model, TrainingData(builtin_data, batch_size=2, seed=0, dist=dist), dist


# Untrained, seed 0's second step is a hair worse than its first (the later steps buy nothing) and seed 1's a hair
# better: each seed exercises one branch of the rule.
@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_sets_the_cheapest_threshold_whose_measured_cost_is_within_budget(builtin_data, seed):
    model, data, dist = _model_and_data(builtin_data, seed)
    everything = contextlib.nullcontext
    forced_model = CognateModel(model.cfg.replace(act_enabled=False))
    forced_model.load_state_dict(model.state_dict())
    forced_figures = trainer.validate(forced_model, data, 2, everything, dist)
    forced = forced_figures["val_loss"]
    gain = forced_figures["val_loss_step_1"] - forced

    def cost(threshold: float) -> float:
        model.cfg = model.cfg.replace(act_threshold=threshold)
        return trainer.validate(model, data, 2, everything, dist)["val_loss"] - forced

    costs = {t: cost(t) for t in THRESHOLD_GRID}
    cap = 0.01
    result = calibrate_halting(model, data, 2, everything, dist, cap, share=0.5)
    assert result.later_steps_gain == pytest.approx(gain) and result.budget == pytest.approx(
        min(cap, 0.5 * gain)
    )
    assert model.cfg.act_threshold == result.threshold
    assert result.loss_delta == pytest.approx(costs[result.threshold], abs=1e-9)
    if gain <= 0:
        assert result.threshold == THRESHOLD_GRID[0]
    else:
        # The cheapest threshold within budget; the bisection assumes the cost falls as the threshold rises.
        within = [t for t in THRESHOLD_GRID if costs[t] <= result.budget]
        assert result.threshold == (within[0] if within else THRESHOLD_GRID[-1])
    validation = trainer.validate(model, data, 2, everything, dist)
    assert validation["val_loss"] - forced == pytest.approx(result.loss_delta, abs=1e-9)
    assert result.validation == pytest.approx(validation)  # the calibrated model's figures, not re-measured
