"""Grokfast gradient filters (Lee et al., 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients").

A filter keeps a low-pass estimate of each parameter's gradient and adds it back, amplified:

    EMA:  ema <- alpha * ema + (1 - alpha) * g      g <- g + lamb * ema
    MA:   avg  = mean of the last `window` gradients g <- g + lamb * avg

The slow component is what gets amplified (`g + lamb * ema`), never the fast one (`g + lamb * (g - ema)`).
Arithmetic follows the reference implementation (ironjr/grokfast, `gradfilter_ema` / `gradfilter_ma`): the EMA
starts from the first gradient it sees, and the MA filter leaves gradients alone until its window is full.
`warmup_steps` delays amplification further: the filter keeps learning the slow component during warmup.

The filter works with any torch optimizer. Call `apply()` after `backward()` (and after any gradient clipping or
accumulation) and before `optimizer.step()`, once per optimizer update. Under DDP the gradients are already
averaged over ranks when `backward()` returns, so every rank updates an identical filter state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cognate.model.config import ConfigError

FILTER_KINDS = ("ema", "ma")


@dataclass(frozen=True)
class GrokfastConfig:
    kind: str = "ema"  # "ema" (alpha) or "ma" (window)
    lamb: float = 2.0  # amplification of the slow gradient
    alpha: float = 0.98  # EMA momentum; used by kind="ema"
    window: int = 100  # gradients averaged; used by kind="ma"
    warmup_steps: int = 0  # optimizer updates before amplification begins

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in FILTER_KINDS:
            problems.append(f"kind={self.kind!r} must be one of {', '.join(FILTER_KINDS)}")
        if self.lamb < 0:
            problems.append(f"lamb={self.lamb} must be non-negative")
        if not 0.0 <= self.alpha < 1.0:
            problems.append(f"alpha={self.alpha} must lie in [0, 1)")
        if self.window < 1:
            problems.append(f"window={self.window} must be at least 1")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be non-negative")
        if problems:
            raise ConfigError("invalid GrokfastConfig: " + "; ".join(problems))


class GrokfastFilter:
    """A Grokfast filter over a fixed list of parameters, with its own `state_dict()`.

    State is kept per parameter (created at its first gradient) and saved by the parameter's position in the
    list, as torch optimizers do, so a filter built over the same parameters in the same order can load it.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], config: GrokfastConfig) -> None:
        self.params = list(params)
        self.config = config
        self.steps = 0  # calls to apply(), i.e. optimizer updates seen
        self.state: dict[torch.nn.Parameter, dict] = {}

    @property
    def amplifying(self) -> bool:
        """Whether the latest apply() was past warmup."""
        return self.steps > self.config.warmup_steps

    @torch.no_grad()
    def apply(self) -> None:
        """Update the slow-gradient estimate from the current `.grad`s and add it, amplified, to them."""
        self.steps += 1
        with_grad = [p for p in self.params if p.grad is not None]
        if self.config.kind == "ema":
            self._apply_ema(with_grad)
        else:
            self._apply_ma(with_grad)

    def _apply_ema(self, params: list[torch.nn.Parameter]) -> None:
        if not params:
            return
        alpha, lamb = self.config.alpha, self.config.lamb
        for p in params:
            if p not in self.state:  # the reference starts the average from the first gradient
                self.state[p] = {"ema": p.grad.detach().clone()}
        grads = [p.grad for p in params]
        emas = [self.state[p]["ema"] for p in params]
        torch._foreach_mul_(emas, alpha)
        torch._foreach_add_(emas, grads, alpha=1.0 - alpha)
        if self.amplifying and lamb:
            torch._foreach_add_(grads, emas, alpha=lamb)

    def _apply_ma(self, params: list[torch.nn.Parameter]) -> None:
        window, lamb = self.config.window, self.config.lamb
        for p in params:
            if p not in self.state:
                self.state[p] = {
                    "window": torch.zeros((window, *p.shape), dtype=p.grad.dtype, device=p.grad.device),
                    "sum": torch.zeros_like(p.grad),
                    "count": 0,
                }
        # Parameters that have seen the same number of gradients share a ring-buffer slot: one foreach each.
        by_count: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
        for p in params:
            by_count[self.state[p]["count"]].append(p)
        for count, group in by_count.items():
            slot = count % window
            states = [self.state[p] for p in group]
            grads = [p.grad for p in group]
            sums = [s["sum"] for s in states]
            slots = [s["window"][slot] for s in states]
            # A running sum keeps the cost per update independent of the window; recomputing it exactly each
            # time the ring wraps stops rounding error from accumulating over a long run.
            torch._foreach_sub_(sums, slots)
            torch._foreach_add_(sums, grads)
            torch._foreach_copy_(slots, grads)
            if slot == window - 1:
                torch._foreach_copy_(sums, [s["window"].sum(0) for s in states])
            for s in states:
                s["count"] = count + 1
            if self.amplifying and lamb and count + 1 >= window:
                torch._foreach_add_(grads, sums, alpha=lamb / window)

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self.params)}
        return {"steps": self.steps, "state": {index[p]: dict(s) for p, s in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = int(state_dict["steps"])
        self.state = {}
        for i, saved in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[p] = {
                k: v.to(device=p.device, dtype=p.dtype).clone() if torch.is_tensor(v) else v
                for k, v in saved.items()
            }
