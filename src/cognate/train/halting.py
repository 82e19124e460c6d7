"""Calibrating the ACT halting threshold on held-out data (CALM's calibration, Schuster et al. 2022).

The halting head is trained to say when stopping early costs at most `act_tolerance` nats on a token
(cognate.model.act), but how sharp its q is after a short run varies from seed to seed: on the tiny seeds one
threshold halted every token, the next none. So the threshold a user gets is not assumed but measured. With
L(τ) the validation loss when tokens halt at threshold τ, L_forced the loss with every step run and
G = L_1 - L_forced what the steps after the first buy (L_1: every token answered from step 1),

    budget = min(cap, share · G)                       halting may give up at most `share` of what recursion buys
    τ*     = the smallest τ on the grid 0.05, 0.10, ..., 0.95 with L(τ) - L_forced <= budget,

found by bisection (L(τ) falls as τ rises: a higher threshold halts a subset of the tokens). The smallest τ halts
the most tokens, so τ* is the cheapest rule whose measured loss cost stays within the budget. When even 0.95 costs
more, τ* = 0.95 and the report says so; when G <= 0 (the later steps buy nothing), τ* = 0.05. A budget in nats
alone would let a model whose later steps buy little halt every token (its τ* would be the lowest grid point): the
share keeps halting a decision per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cognate.model.model import CognateModel
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed
from cognate.train.trainer import validate

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_GAIN_SHARE = 0.5


@dataclass(frozen=True)
class HaltingCalibration:
    threshold: float  # τ*, now the model's act_threshold
    loss_delta: float  # L(τ*) - L_forced on the calibration batches
    mean_steps: float  # at τ*
    var_steps: float
    forced_loss: float
    later_steps_gain: float  # G: the validation loss after step 1 minus that after every step
    within_budget: bool
    budget: float  # min(cap, share · G)
    measured: dict[float, float]  # threshold -> loss delta, for every threshold tried
    validation: (
        dict  # `trainer.validate`'s figures of the model as calibrated (at τ*), so nobody measures them again
    )

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "loss_delta": self.loss_delta,
            "mean_steps": self.mean_steps,
            "var_steps": self.var_steps,
            "forced_loss": self.forced_loss,
            "later_steps_gain": self.later_steps_gain,
            "within_budget": self.within_budget,
            "budget": self.budget,
            "measured": {str(k): v for k, v in sorted(self.measured.items())},
        }


def calibrate_halting(
    model: CognateModel,
    data: TrainingData,
    n_batches: int,
    autocast,
    dist: Distributed,
    cap: float,
    share: float = DEFAULT_GAIN_SHARE,
) -> HaltingCalibration:
    """Set `model.cfg.act_threshold` to τ* (see the module docstring) and return what was measured.

    A model without ACT (or with t_infer 1, where there is nothing to skip) is returned unchanged with a
    calibration at its own threshold and a zero delta.
    """
    cfg = model.cfg
    if not cfg.act_enabled or cfg.t_infer < 2:
        figures = validate(model, data, n_batches, autocast, dist)
        mean_steps, var_steps = figures["val_act_mean_steps"], figures["val_act_var_steps"]
        return HaltingCalibration(
            cfg.act_threshold, 0.0, mean_steps, var_steps, figures["val_loss"], 0.0, True, cap, {}, figures
        )

    def measure(**changes) -> dict:
        model.cfg = cfg.replace(**changes)
        return validate(model, data, n_batches, autocast, dist)

    forced = measure(act_enabled=False)
    forced_loss = forced["val_loss"]
    gain = forced["val_loss_step_1"] - forced_loss
    budget = min(cap, share * gain)
    figures: dict[float, dict] = {}

    def delta(threshold: float) -> float:
        if threshold not in figures:
            figures[threshold] = measure(act_threshold=threshold)
        return figures[threshold]["val_loss"] - forced_loss

    if gain <= 0:  # the later steps buy nothing here: every token may stop at step 1
        threshold = THRESHOLD_GRID[0]
        delta(threshold)
    else:
        threshold = THRESHOLD_GRID[smallest_within_budget(THRESHOLD_GRID, delta, budget)]
    chosen = figures[threshold]
    model.cfg = cfg.replace(act_threshold=threshold)
    return HaltingCalibration(
        threshold=threshold,
        loss_delta=chosen["val_loss"] - forced_loss,
        mean_steps=chosen["val_act_mean_steps"],
        var_steps=chosen["val_act_var_steps"],
        forced_loss=forced_loss,
        later_steps_gain=gain,
        within_budget=chosen["val_loss"] - forced_loss <= budget,
        budget=budget,
        measured={t: f["val_loss"] - forced_loss for t, f in figures.items()},
        validation=chosen,
    )


def smallest_within_budget(grid: Sequence[float], delta: Callable[[float], float], budget: float) -> int:
    """Index of the smallest grid value whose delta is within budget, for a delta that falls along the grid;
    the last index when none is. Bisection: about log2(len(grid)) + 1 calls of `delta`."""
    # Invariant: nothing below `low` is within budget; `high` is, unless it is the last index.
    low, high = 0, len(grid) - 1
    if delta(grid[high]) > budget:
        return high
    while low < high:
        middle = (low + high) // 2
        if delta(grid[middle]) <= budget:
            high = middle
        else:
            low = middle + 1
    return high
