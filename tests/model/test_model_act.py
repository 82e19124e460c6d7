"""The ACT halting loss and statistics: bounded, trained, and pushing halting apart across tokens."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import small_config

from cognate.model.act import act_loss, first_halting_step, step_statistics

CFG = small_config(act_entropy_weight=0.01, act_diversity_weight=0.05, act_target_variance=0.05)


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0.0, 1e4),
    seed=st.integers(0, 2**16),
    n_steps=st.integers(1, 4),
)
def test_act_loss_is_finite_non_negative_and_has_a_gradient(scale, seed, n_steps):
    generator = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(2, 7, generator=generator) * scale).requires_grad_() for _ in range(n_steps)]
    correct = [torch.rand(2, 7, generator=generator) > 0.5 for _ in range(n_steps)]
    valid = torch.rand(2, 7, generator=generator) > 0.2
    loss = act_loss(logits, correct, valid, CFG)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert all(torch.isfinite(x.grad).all() for x in logits)


def test_act_loss_teaches_q_to_predict_whether_the_step_is_right():
    logits = torch.zeros(1, 4, requires_grad=True)
    correct = torch.tensor([[True, True, False, False]])
    act_loss([logits], [correct], torch.ones(1, 4, dtype=torch.bool), CFG).backward()
    assert (logits.grad[0, :2] < 0).all() and (logits.grad[0, 2:] > 0).all()  # descent raises q where right


def test_ignored_tokens_do_not_count():
    logits = torch.zeros(1, 4, requires_grad=True)
    valid = torch.tensor([[True, True, False, False]])
    act_loss([logits], [torch.ones(1, 4, dtype=torch.bool)], valid, CFG).backward()
    assert (logits.grad[0, 2:] == 0).all()


def test_the_diversity_term_penalises_every_token_halting_alike():
    """The seeds' "ACT variance = 0": identical q for all tokens is penalised, spread-out q is not."""
    no_weights = CFG.replace(act_entropy_weight=0.0)
    valid = torch.ones(1, 6, dtype=torch.bool)
    correct = [torch.zeros(1, 6, dtype=torch.bool)]
    alike = torch.full((1, 6), 0.3, requires_grad=True)
    spread = torch.tensor([[-4.0, 4.0, -4.0, 4.0, -4.0, 4.0]])
    with_div = act_loss([alike], correct, valid, no_weights)
    without_div = act_loss([alike], correct, valid, no_weights.replace(act_diversity_weight=0.0))
    torch.testing.assert_close(with_div - without_div, torch.tensor(0.05 * 0.05))
    spread_with = act_loss([spread], correct, valid, no_weights)
    spread_without = act_loss([spread], correct, valid, no_weights.replace(act_diversity_weight=0.0))
    torch.testing.assert_close(spread_with, spread_without)


def test_first_halting_step_is_the_first_step_past_the_threshold_else_the_last():
    probs = [
        torch.tensor([[0.9, 0.1, 0.2]]),
        torch.tensor([[0.1, 0.7, 0.3]]),
        torch.tensor([[0.1, 0.9, 0.4]]),
    ]
    assert first_halting_step(probs, 0.5).tolist() == [[1, 2, 3]]
    mean, var = step_statistics(torch.tensor([[1, 2, 3]]), torch.tensor([[True, True, False]]))
    assert mean.item() == 1.5 and var.item() == 0.25
