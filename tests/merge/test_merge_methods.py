"""Each merge method against merges computed by hand on small tensors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.merge import methods
from cognate.merge.methods import MergeError


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- linear ----------------------------------------------------------------------------------------------------


def test_linear_normalized_is_the_weighted_average():
    merged = methods.linear_tensors([t(1.0, 2.0), t(3.0, 6.0), t(5.0, -4.0)], [2.0, 1.0, 1.0])
    # (2*[1,2] + [3,6] + [5,-4]) / 4
    torch.testing.assert_close(merged, t(2.5, 1.5))


def test_linear_unnormalized_is_the_weighted_sum():
    merged = methods.linear_tensors([t(1.0, 2.0), t(3.0, 6.0)], [0.5, 2.0], normalize=False)
    torch.testing.assert_close(merged, t(6.5, 13.0))


def test_linear_with_weight_one_on_a_model_copies_it_bit_for_bit():
    a, b = torch.randn(50), torch.randn(50)
    assert torch.equal(methods.linear_tensors([a, b], [1.0, 0.0]), a)


def test_linear_rejects_weights_summing_to_zero_and_a_wrong_count():
    with pytest.raises(MergeError, match="sum to 0"):
        methods.linear_tensors([t(1.0), t(2.0)], [1.0, -1.0])
    with pytest.raises(MergeError, match=r"2 weights .* 3 models"):
        methods.linear_tensors([t(1.0), t(2.0), t(3.0)], [1.0, 1.0])


def test_linear_keeps_the_input_dtype_and_leaves_integer_buffers_alone():
    a = {"w": torch.ones(3, dtype=torch.bfloat16), "steps": torch.tensor(7)}
    b = {"w": torch.full((3,), 3.0, dtype=torch.bfloat16), "steps": torch.tensor(9)}
    merged = methods.linear([a, b], [1.0, 1.0])
    assert merged["w"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["w"], torch.full((3,), 2.0, dtype=torch.bfloat16))
    assert merged["steps"].item() == 7  # non-float tensors come from the first model


def test_linear_per_tensor_weights():
    a = {"x": t(0.0), "y": t(0.0)}
    b = {"x": t(1.0), "y": t(1.0)}
    merged = methods.linear([a, b], {"x": [3.0, 1.0], "y": [1.0, 3.0]})
    torch.testing.assert_close(merged["x"], t(0.25))
    torch.testing.assert_close(merged["y"], t(0.75))
    with pytest.raises(MergeError, match="no entry for tensor 'y'"):
        methods.linear([a, b], {"x": [1.0, 1.0]})


# --- slerp -----------------------------------------------------------------------------------------------------


def test_slerp_of_orthogonal_unit_vectors_follows_the_arc():
    a, b = t(1.0, 0.0), t(0.0, 1.0)
    half = math.sqrt(0.5)
    torch.testing.assert_close(methods.slerp_tensors(a, b, 0.5), t(half, half))
    # a third of the way along a quarter circle: (cos 30°, sin 30°)
    torch.testing.assert_close(methods.slerp_tensors(a, b, 1 / 3), t(math.sqrt(3) / 2, 0.5))


def test_slerp_endpoints_are_the_inputs_exactly():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(methods.slerp_tensors(a, b, 0.0), a)
    assert torch.equal(methods.slerp_tensors(a, b, 1.0), b)


def test_slerp_treats_the_whole_tensor_as_one_vector():
    # Row by row these are orthogonal; flattened they are orthogonal too, with norms 1 and 2.
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    half = math.sqrt(0.5)
    # sin(pi/4)/sin(pi/2) * a + sin(pi/4)/sin(pi/2) * b
    torch.testing.assert_close(methods.slerp_tensors(a, b, 0.5), torch.tensor([[half, 2 * half], [0.0, 0.0]]))


def test_slerp_falls_back_to_lerp_for_colinear_or_zero_tensors():
    torch.testing.assert_close(methods.slerp_tensors(t(1.0, 2.0), t(2.0, 4.0), 0.25), t(1.25, 2.5))
    torch.testing.assert_close(methods.slerp_tensors(t(0.0, 0.0), t(2.0, 4.0), 0.5), t(1.0, 2.0))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_slerp_norm_stays_between_the_endpoints_norms_for_unit_vectors(frac, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    a, b = a / a.norm(), b / b.norm()
    assert methods.slerp_tensors(a, b, frac).norm().item() == pytest.approx(1.0, abs=1e-5)


def test_slerp_rejects_a_fraction_outside_zero_one():
    with pytest.raises(MergeError, match="0 <= t <= 1"):
        methods.slerp_tensors(t(1.0), t(2.0), 1.5)


# --- TIES ------------------------------------------------------------------------------------------------------

TIES_MODELS = [
    t(1.0, -2.0, 0.5, 3.0),
    t(-1.5, 1.0, 0.2, -0.1),
    t(2.0, -0.5, -0.4, 1.0),
]


def test_ties_worked_example_trim_elect_disjoint_mean():
    base = t(10.0, 20.0, 30.0, 40.0)
    models = [base + m for m in TIES_MODELS]
    merged = methods.ties_tensors(base, models, [1.0, 1.0, 1.0], density=0.5)
    # Trim to the 2 largest |delta| of 4:  [0, -2, 0, 3]  [-1.5, 1, 0, 0]  [2, 0, 0, 1]
    # Summed: [0.5, -1, 0, 4] -> elected signs [+, -, + (a tie elects +), +]
    # Disjoint means of the agreeing entries: [2/1, -2/1, nobody -> 0, (3+1)/2]
    torch.testing.assert_close(merged, base + t(2.0, -2.0, 0.0, 2.0))


def test_ties_weights_scale_the_task_vectors_before_the_election():
    base = torch.zeros(4)
    # Weighting model 2 by 3 flips the elections of entries 0 (to -) and 1 (to +).
    merged = methods.ties_tensors(base, TIES_MODELS, [1.0, 3.0, 1.0], density=0.5, normalize=False)
    # weighted trimmed: [0,-2,0,3] [-4.5,3,0,0] [2,0,0,1]; sums [-2.5, 1, 0, 4] -> signs [-, +, +, +]
    torch.testing.assert_close(merged, t(-4.5, 3.0, 0.0, 4.0))


def test_ties_with_full_density_and_agreeing_models_is_their_mean():
    base = torch.zeros(3)
    a, b = t(1.0, 2.0, 3.0), t(3.0, 4.0, 5.0)
    torch.testing.assert_close(methods.ties_tensors(base, [a, b], [1.0, 1.0], density=1.0), t(2.0, 3.0, 4.0))


def test_trim_keeps_the_requested_fraction_of_largest_magnitudes():
    magnitudes = torch.arange(1.0, 101.0)
    delta = (magnitudes * torch.where(magnitudes % 3 == 0, -1.0, 1.0))[torch.randperm(100)]
    kept = methods.trim_by_magnitude(delta, 0.1)
    survivors = kept != 0
    assert int(survivors.sum()) == 10
    assert torch.equal(kept[survivors], delta[survivors])
    assert sorted(delta[survivors].abs().tolist()) == list(range(91, 101))


# --- DARE ------------------------------------------------------------------------------------------------------


def test_dare_drops_at_the_requested_rate_and_rescales_survivors():
    delta = torch.randn(200_000) + 5.0  # no entry is exactly 0, so zeros in the result are drops
    dropped = methods.drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(dropped[kept], delta[kept] / 0.3)
    unscaled = methods.drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(0), rescale=False)
    assert torch.equal(unscaled != 0, kept)
    torch.testing.assert_close(unscaled[kept], delta[kept])


def test_dare_masks_are_fixed_by_the_generator_seed():
    delta = torch.randn(1000)
    one = methods.drop_and_rescale(delta, 0.5, torch.Generator().manual_seed(3))
    again = methods.drop_and_rescale(delta, 0.5, torch.Generator().manual_seed(3))
    other = methods.drop_and_rescale(delta, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(one, again) and not torch.equal(one, other)


def test_dare_linear_hand_computed_with_a_known_mask():
    base = t(1.0, 1.0, 1.0, 1.0)
    models = [base + t(2.0, 4.0, 6.0, 8.0), base + t(-1.0, -1.0, -1.0, -1.0)]
    g = torch.Generator().manual_seed(11)
    masks = [(torch.rand(4, generator=g) < 0.5).float() for _ in models]
    merged = methods.dare_tensors(
        base, models, [0.5, 1.0], density=0.5, generator=torch.Generator().manual_seed(11)
    )
    expected = (
        base + 0.5 * masks[0] * t(2.0, 4.0, 6.0, 8.0) / 0.5 + masks[1] * t(-1.0, -1.0, -1.0, -1.0) / 0.5
    )
    torch.testing.assert_close(merged, expected)


def test_dare_ties_elects_signs_on_the_dropped_vectors():
    # density 0.5 with seed 0 keeps entries 0, 2, 3, 4 of the first task vector and 0, 2, 4, 5 of the second (the
    # masks are drawn here as dare_tensors draws them); survivors are doubled.
    base = torch.zeros(6)
    models = [t(4.0, -1.0, 2.0, 3.0, -2.0, 1.0), t(1.0, 3.0, -5.0, 1.0, 1.0, -2.0)]
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(6, generator=g) < 0.5 for _ in models]
    assert [m.nonzero().flatten().tolist() for m in masks] == [[0, 2, 3, 4], [0, 2, 4, 5]]
    merged = methods.dare_tensors(
        base, models, [1.0, 1.0], 0.5, torch.Generator().manual_seed(0), combine="ties", normalize=True
    )
    # dropped: (8, 0, 4, 6, -4, 0) and (2, 0, -10, 0, 2, -4). Entry 0: both +, mean 5; entry 1: nothing left,
    # stays at base; entries 2 and 4: the elected sign is the larger survivor's, the other is left out.
    torch.testing.assert_close(merged, t(5.0, 0.0, -10.0, 6.0, -4.0, -4.0))
    linear = methods.dare_tensors(base, models, [1.0, 1.0], 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear, t(10.0, 0.0, -6.0, 6.0, -2.0, -4.0))  # plain sum: no election, no mean


def test_dare_state_dict_is_deterministic_per_seed_and_tensor_name():
    base = {"a": torch.zeros(64), "b": torch.zeros(64)}
    model = {"a": torch.ones(64), "b": torch.ones(64)}
    one = methods.dare(base, [model], [1.0], density=0.5, seed=1)
    assert torch.equal(one["a"], methods.dare(base, [model], [1.0], density=0.5, seed=1)["a"])
    assert not torch.equal(one["a"], one["b"])  # each tensor draws its own mask
    assert not torch.equal(one["a"], methods.dare(base, [model], [1.0], density=0.5, seed=2)["a"])
    # a tensor's mask does not depend on the other tensors
    assert torch.equal(one["b"], methods.dare({"b": base["b"]}, [{"b": model["b"]}], [1.0], 0.5, seed=1)["b"])


def test_density_outside_zero_one_is_rejected():
    with pytest.raises(MergeError, match="density"):
        methods.trim_by_magnitude(t(1.0), 0.0)
    with pytest.raises(MergeError, match="density"):
        methods.drop_and_rescale(t(1.0), 1.5, torch.Generator())
