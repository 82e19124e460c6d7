"""The ACT halting loss and statistics: bounded, trained, and pushing halting apart across tokens."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import small_config

from cognate.model.act import HaltingHead, act_loss, first_halting_step, step_statistics

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


def test_act_loss_by_hand_on_two_steps_and_three_sequences():
    # Every term restated from the docstring in plain Python: per step, the token mean of BCE(q, correct) +
    # w_ent·(ln 2 − H(q)) over valid tokens, plus w_div · the mean over sequences with 2+ valid tokens of
    # relu(target − Var(q)); then the mean over steps. The sequences have 3, 2 and 1 valid tokens.
    cfg = CFG.replace(act_entropy_weight=0.1, act_diversity_weight=0.5, act_target_variance=0.2)
    logits = [
        torch.tensor([[0.5, -1.0, 2.0], [1.5, -0.5, 0.7], [0.2, 0.0, 9.0]]),
        torch.tensor([[-2.0, 0.3, 1.0], [0.2, 3.0, 1.0], [-1.0, 4.0, 4.0]]),
    ]
    correct = [
        torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]]).bool(),
        torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 1]]).bool(),
    ]

    def by_hand(step_logits, step_correct, valid):
        terms, spreads = [], []
        for row_logits, row_correct, row_valid in zip(
            step_logits.tolist(), step_correct.tolist(), valid.tolist()
        ):
            qs = []
            for logit, right, counts in zip(row_logits, row_correct, row_valid):
                if not counts:
                    continue
                q = 1 / (1 + math.exp(-logit))
                bce = -(math.log(q) if right else math.log(1 - q))
                entropy = -q * math.log(q) - (1 - q) * math.log(1 - q)
                terms.append(bce + 0.1 * (math.log(2) - entropy))
                qs.append(q)
            if len(qs) >= 2:
                mean = sum(qs) / len(qs)
                spreads.append(max(0.0, 0.2 - sum((q - mean) ** 2 for q in qs) / len(qs)))
        return sum(terms) / len(terms) + (0.5 * sum(spreads) / len(spreads) if spreads else 0.0)

    three_two_one = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    one = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    for valid in (three_two_one, one):
        expected = sum(by_hand(lg, c, valid) for lg, c in zip(logits, correct)) / 2
        assert act_loss(logits, correct, valid, cfg).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):  # one `correct` per step, or the loss would silently drop steps
        act_loss(logits, correct[:1], three_two_one, cfg)


def test_halting_is_strictly_past_the_threshold_and_one_step_halts_at_it():
    assert first_halting_step([torch.tensor([[0.5, 0.51]])], 0.5).tolist() == [[1, 1]]
    probs = [torch.tensor([[0.5, 0.51]]), torch.tensor([[0.5, 0.2]])]
    assert first_halting_step(probs, 0.5).tolist() == [[2, 1]]
    mean, var = step_statistics(torch.tensor([[3, 1]]), torch.tensor([[True, False]]))  # a single valid token
    assert (mean.item(), var.item()) == (3.0, 0.0)


def test_a_new_halting_head_is_pessimistic_for_every_state():
    # The module docstring: an untrained head gives q ≈ 0.12 (bias −2, small weights), so tokens refine fully.
    head = HaltingHead(small_config())
    states = torch.nn.functional.rms_norm(
        torch.randn(4, 9, small_config().d_model), (small_config().d_model,)
    )
    logits = head(states)
    assert logits.shape == (4, 9) and logits.dtype == torch.float32
    q = torch.sigmoid(logits)
    assert q.min() > 0.10 and q.max() < 0.14
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(states).dtype == torch.float32  # the loss is computed on float32 logits
