"""The trainer's optimizer: one of cognate.optim's three kinds from a named preset, with the run's overrides.

Every group remembers its `base_lr`; the trainer sets `lr = base_lr * schedule(tokens)` before each update, so
the schedule reaches the optimizer (the seeds' scheduler wrote to a field the optimizer never read).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cognate.optim.mugrokfast import make_optimizer, preset
from cognate.train.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    settings = preset(config.optimizer_preset)
    if config.lr is not None:
        settings = settings.replace(adamw_lr=config.lr)
    if config.muon_lr is not None:
        settings = settings.replace(muon_lr=config.muon_lr)
    if config.grokfast_warmup_steps is not None:
        settings = settings.replace(
            grokfast=dataclasses.replace(settings.grokfast, warmup_steps=config.grokfast_warmup_steps)
        )
    optimizer = make_optimizer(model, config.optimizer, settings)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer
