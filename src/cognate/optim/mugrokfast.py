"""MuGrokfast: a Grokfast filter on the gradients, then Muon for hidden matrices and AdamW for the rest.

One `torch.optim.Optimizer`: its `param_groups` are the real groups (`kind` "muon" or "adamw"), so a scheduler or
a trainer that writes `group["lr"]` changes the next step, and `state_dict()` carries the filter's state beside
the optimizer's, so a run resumed from a checkpoint continues bit for bit.

`make_optimizer(model, "adamw" | "muon" | "mugrokfast", config)` builds any of the three from one config, so
comparisons share learning rates, betas and weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from cognate.model.config import ConfigError
from cognate.optim.grokfast import GrokfastConfig, GrokfastFilter
from cognate.optim.grouping import Assign, group_parameters
from cognate.optim.muon import adamw_step, muon_step

OPTIMIZER_KINDS = ("adamw", "muon", "mugrokfast")
GROUP_KEYS = {  # what each kind of MuGrokfast param group must say
    "muon": ("lr", "momentum", "nesterov", "weight_decay", "ns_steps"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}


@dataclass(frozen=True)
class MuGrokfastConfig:
    adamw_lr: float = 5e-4
    muon_lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.1  # AdamW, decoupled; parameters with fewer than 2 dimensions never decay
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_weight_decay: float = 0.0  # decoupled, as the reference Muon (default 0 there too)
    ns_steps: int = 5
    grokfast: GrokfastConfig = field(default_factory=GrokfastConfig)  # used by "mugrokfast" only

    def __post_init__(self) -> None:
        problems = []
        for name in ("adamw_lr", "muon_lr", "eps", "weight_decay", "muon_weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be non-negative")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas={self.betas} must be two values in [0, 1)")
        if not 0.0 <= self.muon_momentum < 1.0:
            problems.append(f"muon_momentum={self.muon_momentum} must lie in [0, 1)")
        if self.ns_steps < 1:
            problems.append(f"ns_steps={self.ns_steps} must be at least 1")
        if problems:
            raise ConfigError("invalid MuGrokfastConfig: " + "; ".join(problems))

    def replace(self, **changes) -> MuGrokfastConfig:
        return replace(self, **changes)


# The seeds' two settings. The pretraining guide gives AdamW lr 2e-4 (betas 0.9/0.95, weight decay 0.1) and
# Grokfast EMA alpha 0.98, lamb 2.0 with a 2,000-step warmup, but no Muon rate: we keep the Phase 1 document's
# Muon:AdamW ratio of 10. The Phase 1 document's reduced rates: AdamW 5e-4, Muon 5e-3, lamb 0.02.
PRESETS: dict[str, MuGrokfastConfig] = {
    "pretraining-guide": MuGrokfastConfig(
        adamw_lr=2e-4,
        muon_lr=2e-3,
        grokfast=GrokfastConfig(kind="ema", alpha=0.98, lamb=2.0, warmup_steps=2000),
    ),
    "phase1-reduced": MuGrokfastConfig(
        adamw_lr=5e-4,
        muon_lr=5e-3,
        grokfast=GrokfastConfig(kind="ema", alpha=0.98, lamb=0.02, warmup_steps=2000),
    ),
}


def preset(name: str) -> MuGrokfastConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown optimizer preset {name!r}; presets are {', '.join(PRESETS)}")
    return PRESETS[name]


class MuGrokfast(torch.optim.Optimizer):
    """Muon + AdamW over explicit groups, with an optional Grokfast filter applied first to every gradient.

    Each group is a dict with `params` and `kind`: "muon" groups need `lr`, `momentum`, `nesterov`,
    `weight_decay`, `ns_steps`; "adamw" groups need `lr`, `betas`, `eps`, `weight_decay`. Extra keys (a `name`)
    are kept. With `grokfast=None` this is plain Muon + AdamW.

    The filter runs inside `step()`, so it sees the gradients the caller hands over: after DDP's averaging,
    gradient accumulation and clipping, once per update.
    """

    def __init__(self, param_groups: list[dict], grokfast: GrokfastConfig | None = None) -> None:
        # Created before the groups are added: add_param_group registers each group's parameters with it.
        self.grokfast = GrokfastFilter([], grokfast) if grokfast is not None else None
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in GROUP_KEYS:
            raise ValueError(f"a MuGrokfast param group needs kind 'muon' or 'adamw', got {kind!r}")
        missing = [key for key in GROUP_KEYS[kind] if key not in param_group]
        if missing:
            raise ValueError(f"a {kind!r} param group is missing {', '.join(missing)}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if kind == "muon" and any(p.dim() < 2 for p in params):
            raise ValueError("Muon trains matrices only; a parameter with fewer than 2 dimensions reached it")
        super().add_param_group({**param_group, "params": params})
        if self.grokfast is not None:
            self.grokfast.params.extend(params)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grokfast is not None:
            self.grokfast.apply()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["kind"] == "muon":
                self._muon(group, params)
            elif params:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        muon_step(
            params,
            [p.grad for p in params],
            [self.state[p]["momentum_buffer"] for p in params],
            lr=group["lr"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            ns_steps=group["ns_steps"],
        )

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        adamw_step(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [self.state[p]["step"] for p in params],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.grokfast is not None:
            state["grokfast"] = self.grokfast.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        grokfast = state_dict.pop("grokfast", None)
        if (grokfast is None) != (self.grokfast is None):
            saved = "has" if grokfast is not None else "has no"
            ours = "uses" if self.grokfast is not None else "does not use"
            raise ValueError(
                f"the saved optimizer state {saved} Grokfast state, but this optimizer {ours} a filter"
            )
        super().load_state_dict(state_dict)
        if self.grokfast is not None:
            self.grokfast.load_state_dict(grokfast)


def param_groups(
    model: nn.Module, kind: str, config: MuGrokfastConfig, assign: Assign | None = None
) -> list[dict]:
    """torch param groups for `model` under the grouping rule (see cognate.optim.grouping), named by group.

    For "adamw" the Muon group's matrices are trained by AdamW with weight decay, like the other matrices.
    """
    groups = group_parameters(model, assign)
    adamw = {"kind": "adamw", "lr": config.adamw_lr, "betas": config.betas, "eps": config.eps}
    muon = {
        "kind": "muon",
        "lr": config.muon_lr,
        "momentum": config.muon_momentum,
        "nesterov": config.muon_nesterov,
        "weight_decay": config.muon_weight_decay,
        "ns_steps": config.ns_steps,
    }
    if kind == "adamw":
        groups["adamw"] = {**groups.pop("muon"), **groups["adamw"]}
    specs = {
        "muon": muon,
        "adamw": {**adamw, "weight_decay": config.weight_decay},
        "adamw_no_decay": {**adamw, "weight_decay": 0.0},
    }
    return [
        {"name": name, "params": list(params.values()), **specs[name]}
        for name, params in groups.items()
        if params
    ]


def make_optimizer(
    model: nn.Module, kind: str, config: MuGrokfastConfig, assign: Assign | None = None
) -> torch.optim.Optimizer:
    """ "adamw": torch.optim.AdamW; "muon": Muon + AdamW; "mugrokfast": the same behind a Grokfast filter."""
    if kind not in OPTIMIZER_KINDS:
        raise ConfigError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZER_KINDS)}")
    groups = param_groups(model, kind, config, assign)
    if kind == "adamw":
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "kind"} for g in groups])
    return MuGrokfast(groups, config.grokfast if kind == "mugrokfast" else None)
