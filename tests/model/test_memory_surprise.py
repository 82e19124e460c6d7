"""The memory's write surprise: what it measures, and that no refinement step runs the LM head only to get it."""

import pytest
import torch
from model_testing import random_tokens, small_model

import cognate.model.model as model_module
from cognate.model.model import token_surprise


def test_surprise_is_how_far_the_previous_state_points_from_the_token_that_came():
    head = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[3, 1, 4, 2]])
    # Position i - 1 points at the head row of token i (i = 1), away from it (i = 2), across it (i = 3).
    orthogonal = torch.linalg.svd(head[2][None]).Vh[1]
    states = torch.stack([head[1], -head[4], orthogonal, torch.randn(8)])[None]
    surprise = token_surprise(states, input_ids, head)
    assert surprise[0, 0].isnan()  # nothing came before the first token
    torch.testing.assert_close(surprise[0, 1:], torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0)
    # The last state of a previous call scores the first token.
    continued = token_surprise(states, input_ids, head, previous_state=head[3][None])
    assert continued[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(continued[0, 1:], surprise[0, 1:])


def count_head_uses(model, monkeypatch) -> dict[str, int]:
    """Counts the fused head's calls and the LM head module's calls."""
    counts = {"fused": 0, "module": 0}
    fused = model_module.fused_linear_cross_entropy

    def counting_fused(*args, **kwargs):
        counts["fused"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(model_module, "fused_linear_cross_entropy", counting_fused)
    model.lm_head.register_forward_hook(lambda *_: counts.__setitem__("module", counts["module"] + 1))
    return counts


def test_training_runs_the_lm_head_only_on_the_steps_with_a_loss(monkeypatch):
    # t_train 5, t_infer 1, grad_steps 2: steps 1, 4 and 5 carry a loss; steps 2 and 3 run under no_grad.
    model = small_model(t_train=5, t_infer=1, grad_steps=2, act_enabled=False).train()
    counts = count_head_uses(model, monkeypatch)
    ids = random_tokens(2, 24)
    out = model(ids, torch.roll(ids, -1, 1))
    assert out.memory_state is not None  # the memory is on at this length
    assert counts == {"fused": 3, "module": 0}


@pytest.mark.parametrize("act_enabled", [False, True])
def test_inference_reads_the_lm_head_out_once_whatever_the_steps(monkeypatch, act_enabled):
    model = small_model(t_infer=3, act_enabled=act_enabled).eval()
    counts = count_head_uses(model, monkeypatch)
    with torch.no_grad():
        out = model(random_tokens(2, 24))
    assert out.memory_state is not None
    assert counts == {"fused": 0, "module": 1}
