"""The ACT halting loss, its consistency target and the halting statistics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import random_tokens, small_config, small_model

from cognate.model.act import HaltingHead, act_loss, first_halting_step, halting_targets, step_statistics


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0.0, 1e4),
    seed=st.integers(0, 2**16),
    n_steps=st.integers(1, 4),
)
def test_act_loss_is_finite_non_negative_and_has_a_gradient(scale, seed, n_steps):
    generator = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(2, 7, generator=generator) * scale).requires_grad_() for _ in range(n_steps)]
    targets = [torch.rand(2, 7, generator=generator) > 0.5 for _ in range(n_steps)]
    valid = torch.rand(2, 7, generator=generator) > 0.2
    loss = act_loss(logits, targets, valid)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert all(torch.isfinite(x.grad).all() for x in logits)


def test_the_target_is_whether_halting_costs_at_most_the_tolerance_not_whether_the_step_is_right():
    """CALM's risk consistency: halting at t is right where step t's CE is within the tolerance of step R's."""
    step_1 = torch.tensor([[2.0, 3.0, 0.5, 9.0]])
    step_2 = torch.tensor([[1.95, 2.0, 0.5, 9.0]])
    step_3 = torch.tensor([[1.9, 2.0, 0.45, 8.0]])
    targets = halting_targets([step_1, step_2, step_3], tolerance=0.1)
    assert [t.tolist() for t in targets] == [[[True, False, True, False]], [[True, True, True, False]]]


def test_act_loss_teaches_q_to_predict_its_target_and_ignores_unscored_tokens():
    logits = torch.zeros(1, 4, requires_grad=True)
    target = torch.tensor([[True, False, True, False]])
    valid = torch.tensor([[True, True, False, False]])
    act_loss([logits], [target], valid).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises q where the step already agrees
    assert (logits.grad[0, 2:] == 0).all()


def test_training_fits_q_of_steps_before_t_infer_to_the_cost_of_halting_there():
    """L_act in training is the BCE against [CE_t <= CE_t_infer + tolerance] for t < t_infer."""
    model = small_model(t_train=4, t_infer=3, grad_steps=1, act_tolerance=0.0).train()
    tokens = random_tokens(2, 21)
    targets = torch.roll(tokens, -1, 1)
    recorded = []
    hook = model.halting.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach()))
    out = model(tokens, targets=targets)
    hook.remove()
    assert len(recorded) == 2  # steps 1 and 2 decide; step t_infer = 3 stops anyway
    with torch.no_grad():
        # Without halting, evaluation gives each step's CE of the training forward.
        forced = small_model(t_train=4, t_infer=3, grad_steps=1, act_enabled=False)
        forced.load_state_dict(model.state_dict())
        step_ce = forced.eval()(tokens, targets=targets).step_losses
    costs_little = halting_targets(step_ce, 0.0)
    assert 0 < torch.stack(costs_little).float().mean() < 1
    expected = torch.stack(
        [
            torch.nn.functional.binary_cross_entropy_with_logits(q, target.float())
            for q, target in zip(recorded, costs_little, strict=True)
        ]
    ).mean()
    torch.testing.assert_close(out.losses["act"], expected, rtol=1e-4, atol=1e-5)


def test_first_halting_step_is_the_first_step_past_the_threshold_else_the_last():
    probs = [torch.tensor([[0.9, 0.1, 0.2]]), torch.tensor([[0.1, 0.7, 0.3]])]
    assert first_halting_step(probs, 0.5, 3).tolist() == [[1, 2, 3]]
    mean, var = step_statistics(torch.tensor([[1, 2, 3]]), torch.tensor([[True, True, False]]))
    assert mean.item() == 1.5 and var.item() == 0.25


def test_act_loss_by_hand_on_two_steps_and_three_sequences():
    # The docstring restated in plain Python: per step, the mean over valid tokens of BCE(q, target); then the
    # mean over steps. The sequences have 3, 2 and 1 valid tokens.
    logits = [
        torch.tensor([[0.5, -1.0, 2.0], [1.5, -0.5, 0.7], [0.2, 0.0, 9.0]]),
        torch.tensor([[-2.0, 0.3, 1.0], [0.2, 3.0, 1.0], [-1.0, 4.0, 4.0]]),
    ]
    targets = [
        torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]]).bool(),
        torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 1]]).bool(),
    ]

    def by_hand(step_logits, step_targets, valid):
        terms = []
        for row_logits, row_targets, row_valid in zip(
            step_logits.tolist(), step_targets.tolist(), valid.tolist()
        ):
            for logit, halt, counts in zip(row_logits, row_targets, row_valid):
                if counts:
                    q = 1 / (1 + math.exp(-logit))
                    terms.append(-(math.log(q) if halt else math.log(1 - q)))
        return sum(terms) / len(terms)

    three_two_one = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    one = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    for valid in (three_two_one, one):
        expected = sum(by_hand(lg, t, valid) for lg, t in zip(logits, targets)) / 2
        assert act_loss(logits, targets, valid).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):  # one target per step, or the loss would silently drop steps
        act_loss(logits, targets[:1], three_two_one)


def test_halting_is_strictly_past_the_threshold_and_one_step_halts_at_it():
    assert first_halting_step([torch.tensor([[0.5, 0.51]])], 0.5, 2).tolist() == [[2, 1]]
    probs = [torch.tensor([[0.5, 0.51]]), torch.tensor([[0.5, 0.2]])]
    assert first_halting_step(probs, 0.5, 3).tolist() == [[3, 1]]
    mean, var = step_statistics(torch.tensor([[3, 1]]), torch.tensor([[True, False]]))  # a single valid token
    assert (mean.item(), var.item()) == (3.0, 0.0)


def test_a_new_halting_head_starts_just_below_the_default_threshold_for_every_state():
    # The module docstring: an untrained head gives q ≈ 0.38 (bias −0.5, small weights), so tokens refine fully
    # at the default threshold 0.5, and a little training is enough to cross it.
    head = HaltingHead(small_config())
    states = torch.nn.functional.rms_norm(
        torch.randn(4, 9, small_config().d_model), (small_config().d_model,)
    )
    logits = head(states)
    assert logits.shape == (4, 9) and logits.dtype == torch.float32
    q = torch.sigmoid(logits)
    assert q.min() > 0.36 and q.max() < 0.40
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(states).dtype == torch.float32  # the loss is computed on float32 logits
