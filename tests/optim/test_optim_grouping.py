"""The grouping rule: every kind of parameter goes to the optimizer meant for it."""

import pytest
import torch
from torch import nn

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.optim import GROUP_NAMES, group_parameters


class Toy(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16, bias=False)
        self.conv = nn.Conv1d(16, 16, kernel_size=3)
        self.halting_head = nn.Linear(16, 1)
        self.memory_init = nn.Parameter(torch.zeros(8, 16))
        self.gate = nn.Parameter(torch.zeros(()))
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        if tie:
            self.lm_head.weight = self.embed.weight


def names(groups):
    return {group: sorted(params) for group, params in groups.items()}


def test_each_kind_of_parameter_lands_in_its_group():
    assert names(group_parameters(Toy())) == {
        "muon": ["conv.weight", "down.weight", "up.weight"],
        "adamw": ["embed.weight", "halting_head.weight", "lm_head.weight", "memory_init"],
        "adamw_no_decay": ["conv.bias", "gate", "halting_head.bias", "norm.bias", "norm.weight", "up.bias"],
    }


def test_every_trainable_parameter_appears_exactly_once_even_when_tied():
    model = Toy(tie=True)
    groups = group_parameters(model)
    placed = [p for params in groups.values() for p in params.values()]
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() deduplicates tied ones
    assert len(placed) == len(trainable) and {id(p) for p in placed} == {id(p) for p in trainable}
    assert "embed.weight" in groups["adamw"]  # the tied head/embedding is never a Muon matrix


def test_output_head_found_through_get_output_embeddings():
    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(8, 8)
            self.out = nn.Linear(8, 30)

        def get_output_embeddings(self):
            return self.out

    groups = group_parameters(HFStyle())
    assert "out.weight" in groups["adamw"] and "hidden.weight" in groups["muon"]


def test_assign_hook_overrides_the_rule():
    groups = group_parameters(Toy(), assign=lambda name, p: "adamw" if name.startswith("up.") else None)
    assert "up.weight" in groups["adamw"] and "up.bias" in groups["adamw"]
    assert "down.weight" in groups["muon"]
    with pytest.raises(ValueError, match=r"up\.weight"):
        group_parameters(Toy(), assign=lambda name, p: "sgd" if name == "up.weight" else None)
    assert set(groups) == set(GROUP_NAMES)


def test_the_tiny_preset_groups_as_docs_optim_states():
    # docs/optim.md, "Which parameters go where": Muon 44 matrices (1.35M parameters); AdamW the embeddings, the
    # head and three 1 x d heads (8.19M); 21 one-dimensional tensors without decay.
    with torch.device("meta"):
        model = CognateModel(get_preset("tiny").replace(vocab_size=32_000))
    groups = group_parameters(model)
    count = {name: (len(params), sum(p.numel() for p in params.values())) for name, params in groups.items()}
    assert count == {"muon": (44, 1_347_072), "adamw": (5, 8_192_348), "adamw_no_decay": (21, 2_398)}
    assert all(p.dim() == 1 for p in groups["adamw_no_decay"].values())
    assert sorted(n for n, p in groups["adamw"].items() if p.shape[0] == 1) == [
        "halting.out.weight",
        "memory.pool_score.weight",
        "memory.write_gate.weight",
    ]
