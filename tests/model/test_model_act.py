"""The ACT halting loss, its consistency target and the halting statistics."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import random_tokens, small_model

from cognate.model.act import act_loss, first_halting_step, halting_targets, step_statistics


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
