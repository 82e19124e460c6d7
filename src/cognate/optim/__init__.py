"""Optimizers: Muon, Grokfast gradient filters, and their combination MuGrokfast."""

from cognate.optim.grokfast import GrokfastConfig, GrokfastFilter
from cognate.optim.grouping import GROUP_NAMES, group_parameters
from cognate.optim.mugrokfast import (
    OPTIMIZER_KINDS,
    PRESETS,
    MuGrokfast,
    MuGrokfastConfig,
    make_optimizer,
    param_groups,
    preset,
)
from cognate.optim.muon import newton_schulz

__all__ = [
    "GROUP_NAMES",
    "OPTIMIZER_KINDS",
    "PRESETS",
    "GrokfastConfig",
    "GrokfastFilter",
    "MuGrokfast",
    "MuGrokfastConfig",
    "group_parameters",
    "make_optimizer",
    "newton_schulz",
    "param_groups",
    "preset",
]
