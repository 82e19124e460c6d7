"""Which optimizer trains which parameter: the one rule, in one function.

Every trainable parameter lands in exactly one group:

    muon            weights of hidden Linear/Conv layers: real matrices (at least 2 x 2) that map a hidden state
                    to a hidden state
    adamw           embeddings, the output head (tied or not), and any other parameter with 2+ dimensions:
                    vector-like matrices (a 1 x d halting head), learned tables such as memory initialisations
    adamw_no_decay  everything with fewer than 2 dimensions: norm gains, biases, scalars; AdamW without weight
                    decay, as in nanoGPT and litgpt, so that decay does not pull gains toward zero

The output head is the module `model.get_output_embeddings()` returns (the transformers convention) or, failing
that, any module named `lm_head`. An `assign(name, param)` hook runs first and may return a group name to
override the rule for particular parameters (return None to keep the rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GROUP_NAMES = ("muon", "adamw", "adamw_no_decay")
HIDDEN_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
OUTPUT_HEAD_NAMES = ("lm_head",)

Assign = Callable[[str, nn.Parameter], "str | None"]


def group_parameters(model: nn.Module, assign: Assign | None = None) -> dict[str, dict[str, nn.Parameter]]:
    """Sort `model`'s trainable parameters into {group: {name: parameter}}, every group present."""
    owners: dict[nn.Parameter, list[nn.Module]] = {}
    names: dict[nn.Parameter, str] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                owners.setdefault(param, []).append(module)
                names.setdefault(param, f"{module_name}.{param_name}" if module_name else param_name)
    heads = _output_heads(model)
    groups: dict[str, dict[str, nn.Parameter]] = {group: {} for group in GROUP_NAMES}
    for param, modules in owners.items():
        name = names[param]
        group = assign(name, param) if assign is not None else None
        if group is None:
            group = _rule(param, modules, heads)
        elif group not in GROUP_NAMES:
            raise ValueError(f"assign() put {name} in {group!r}; groups are {', '.join(GROUP_NAMES)}")
        groups[group][name] = param
    return groups


def _rule(param: nn.Parameter, owners: list[nn.Module], heads: list[nn.Module]) -> str:
    if param.dim() < 2:
        return "adamw_no_decay"
    if any(isinstance(m, nn.Embedding) or any(m is h for h in heads) for m in owners):
        return "adamw"
    rows, cols = param.shape[0], param[0].numel()
    if all(isinstance(m, HIDDEN_LAYER_TYPES) for m in owners) and min(rows, cols) >= 2:
        return "muon"
    return "adamw"


def _output_heads(model: nn.Module) -> list[nn.Module]:
    heads = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES]
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and isinstance(get_output(), nn.Module):
        heads.append(get_output())
    return heads


def describe_groups(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Parameter counts per group, for logs: {group: {"tensors": n, "parameters": n}}."""
    return {
        group: {"tensors": len(params), "parameters": sum(p.numel() for p in params.values())}
        for group, params in groups.items()
    }
