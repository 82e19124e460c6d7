"""Parameter counts per component, as a pure function of the module tree.

Each parameter is counted once (a tied LM head shares the embedding's tensor and counts under embeddings), so the
components always sum to the model's total.
"""

from __future__ import annotations

from torch import nn

from cognate.model.act import HaltingHead
from cognate.model.layers import RMSNorm
from cognate.model.memory import LongTermMemory, MemoryRead
from cognate.model.neural_memory import NeuralMemory, NeuralMemoryRead

COMPONENTS = ("embeddings", "blocks", "norms", "memory", "act_head", "lm_head")


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """{component: parameter count} over COMPONENTS; "blocks" is self-attention + FFN, the rest of each block
    being its norms and its memory read."""
    owners = {
        name: component for name, module in model.named_modules() if (component := _owner(name, module))
    }
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, parameter in model.named_parameters():
        counts[_component(name, owners)] += parameter.numel()
    return counts


def layer_breakdown(block: nn.Module) -> dict[str, int]:
    """{sub-module: parameter count} of one transformer block."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in block.named_children()}
    return {name: count for name, count in counts.items() if count}


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _owner(name: str, module: nn.Module) -> str | None:
    """The component a module's parameters belong to, for the modules that decide it."""
    if isinstance(module, (MemoryRead, LongTermMemory, NeuralMemoryRead, NeuralMemory)):
        return "memory"
    if isinstance(module, HaltingHead):
        return "act_head"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if name == "lm_head":
        return "lm_head"
    if isinstance(module, (RMSNorm, nn.RMSNorm)):
        return "norms"
    return None


def _component(parameter_name: str, owners: dict[str, str]) -> str:
    """The outermost deciding module on the parameter's path wins (a norm inside the memory is memory)."""
    parts = parameter_name.split(".")
    for depth in range(1, len(parts)):
        owner = owners.get(".".join(parts[:depth]))
        if owner is not None:
            return owner
    if parts[0] == "layers":
        return "blocks"
    raise ValueError(f"parameter {parameter_name!r} belongs to no known component of {COMPONENTS}")
