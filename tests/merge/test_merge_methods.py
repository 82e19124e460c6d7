"""Each merge method against merges computed by hand on small tensors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.merge import methods
from cognate.merge.compat import IncompatibleModelsError
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
    unscaled = methods.dare_tensors(
        base, models, [1.0, 1.0], 0.5, torch.Generator().manual_seed(0), rescale=False
    )
    torch.testing.assert_close(unscaled, t(5.0, 0.0, -3.0, 3.0, -1.0, -2.0))  # survivors kept as they were


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


# --- dtypes, defaults and messages (each found by mutation testing, docs/testing.md) ---------------------------


def test_bf16_inputs_are_merged_in_float32_and_returned_in_bf16():
    # The same merge of the same values in float32, rounded once to bf16 at the end: computing in bf16 instead
    # would round every intermediate sum and difference (4,096 random entries make that visible).
    generator = torch.Generator().manual_seed(0)
    a, b, base = (torch.randn(4096, generator=generator).bfloat16() for _ in range(3))
    colinear = (2.0 * a.float()).bfloat16()  # |cos| ~ 1: slerp falls back to lerp
    merges = {
        "linear": (
            methods.linear_tensors([a, b], [0.3, 0.7]),
            lambda x, y: methods.linear_tensors([x, y], [0.3, 0.7]),
        ),
        "slerp": (methods.slerp_tensors(a, b, 0.4), lambda x, y: methods.slerp_tensors(x, y, 0.4)),
        "slerp colinear": (
            methods.slerp_tensors(a, colinear, 0.4),
            lambda x, y: methods.slerp_tensors(x, colinear.float(), 0.4),
        ),
        "slerp from zero": (  # a ~zero tensor has no direction: lerp
            methods.slerp_tensors(torch.zeros_like(a), b, 0.4),
            lambda x, y: methods.slerp_tensors(torch.zeros_like(x), y, 0.4),
        ),
        "ties": (
            methods.ties_tensors(base, [a, b], [1.0, 0.5], density=0.5),
            lambda x, y: methods.ties_tensors(base.float(), [x, y], [1.0, 0.5], density=0.5),
        ),
        "dare": (
            methods.dare_tensors(base, [a, b], [1.0, 0.5], 0.5, torch.Generator().manual_seed(1)),
            lambda x, y: methods.dare_tensors(
                base.float(), [x, y], [1.0, 0.5], 0.5, torch.Generator().manual_seed(1)
            ),
        ),
    }
    for name, (merged, in_float32) in merges.items():
        assert merged.dtype == torch.bfloat16, name
        assert torch.equal(merged, in_float32(a.float(), b.float()).bfloat16()), name


def test_float32_inputs_are_summed_in_float32():
    # 1 + 2^-24 + 2^-24 is 1 in float32 (each addition rounds to even) but 1 + 2^-23 in float64.
    tiny = 2.0**-24
    merged = methods.linear_tensors([t(1.0), t(tiny), t(tiny)], [1.0, 1.0, 1.0], normalize=False)
    assert merged.item() == 1.0


def test_float64_inputs_keep_float64_precision():
    a = torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0 - 1e-12], dtype=torch.float64)
    base = torch.zeros(2, dtype=torch.float64)
    assert methods.linear_tensors([a, b], [1.0, 1.0]).tolist() == [1.0 + 0.5e-12, 2.0 - 0.5e-12]
    assert methods.ties_tensors(base, [a], [0.1], density=1.0, normalize=False).tolist() == (0.1 * a).tolist()
    dare = methods.dare_tensors(base, [a, b], [1.0, 1.0], 1.0, torch.Generator())
    assert dare.dtype == torch.float64 and dare.tolist() == (a + b).tolist()


def test_slerp_of_vectors_that_are_not_unit_length_by_hand():
    # a = (2, 0) and b = (3, 3) are 45 degrees apart: at t = 1/2 both coefficients are sin(22.5°) / sin(45°).
    coefficient = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    merged = methods.slerp_tensors(t(2.0, 0.0), t(3.0, 3.0), 0.5)
    torch.testing.assert_close(merged, t(5.0 * coefficient, 3.0 * coefficient))


def test_ties_trims_to_at_least_one_entry_and_breaks_a_zero_sum_towards_plus():
    # density 0.1 of 5 entries: int(0.5) = 0, so k = 1 keeps only the largest magnitude.
    torch.testing.assert_close(
        methods.trim_by_magnitude(t(1.0, -4.0, 2.0, 3.0, 0.5), 0.1), t(0, -4.0, 0, 0, 0)
    )
    # +1 and -1 sum to exactly 0: mergekit elects +, so only the +1 counts.
    merged = methods.ties_tensors(t(0.0), [t(1.0), t(-1.0)], [1.0, 1.0], density=1.0)
    torch.testing.assert_close(merged, t(1.0))


def test_ties_normalises_by_weights_that_sum_below_one():
    # Both agree: (0.25·2 + 0.25·4) / (0.25 + 0.25) = 3; a divisor below 1 is a real divisor, not "zero".
    merged = methods.ties_tensors(t(0.0), [t(2.0), t(4.0)], [0.25, 0.25], density=1.0)
    torch.testing.assert_close(merged, t(3.0))


def test_state_dict_merges_have_mergekits_defaults_and_pass_every_setting_on():
    base = {"w": t(0.0, 0.0, 0.0, 0.0)}
    models = [{"w": t(4.0, -1.0, 2.0, 3.0)}, {"w": t(1.0, 3.0, -5.0, 1.0)}]
    tensors = [m["w"] for m in models]
    ties_default = methods.ties(base, models, [1.0, 0.5])["w"]
    torch.testing.assert_close(methods.ties_tensors(base["w"], tensors, [1.0, 0.5]), ties_default)
    torch.testing.assert_close(
        ties_default, methods.ties_tensors(base["w"], tensors, [1.0, 0.5], 0.5, 1.0, True)
    )
    ties_set = methods.ties(base, models, [1.0, 0.5], density=0.75, scale=0.5, normalize=False)["w"]
    torch.testing.assert_close(
        ties_set, methods.ties_tensors(base["w"], tensors, [1.0, 0.5], 0.75, 0.5, False)
    )
    for options in ({}, {"rescale": False, "combine": "ties", "scale": 0.5, "normalize": True}):
        merged = methods.dare(base, models, [1.0, 0.5], density=0.5, seed=3, **options)["w"]
        generator = torch.Generator().manual_seed(methods.tensor_seed(3, "w"))
        full = {"rescale": True, "combine": "linear", "scale": 1.0, "normalize": False, **options}
        expected = methods.dare_tensors(base["w"], tensors, [1.0, 0.5], 0.5, generator, **full)
        torch.testing.assert_close(merged, expected)
    assert methods.linear(models, [1.0, 3.0], normalize=False)["w"].tolist() == [7.0, 8.0, -13.0, 6.0]


def test_a_tensors_dare_seed_is_fixed_across_versions():
    # Saved recipes replay to the same weights (docs/merge.md), so the per-tensor seed may never change:
    # the first 8 bytes of sha256("seed:name"), little-endian, shifted right once (63 bits).
    assert methods.tensor_seed(0, "layers.0.attn.qkv.weight") == 5558479870052188762
    assert methods.tensor_seed(7, "embed.weight") == 1213468208686187750


def test_merge_errors_say_what_is_wrong():
    with pytest.raises(MergeError, match=r"^a merge needs at least one model$"):
        methods.linear([], [])
    with pytest.raises(MergeError) as error:
        methods.linear_tensors([t(1.0), t(2.0)], [1.0])
    assert str(error.value) == "got 1 weights for 2 models"
    with pytest.raises(MergeError) as error:
        methods.linear([{"w": t(1.0)}, {"w": t(2.0)}], {"w": [1.0]})
    assert str(error.value) == "got 1 weights for tensor 'w' for 2 models"
    with pytest.raises(MergeError, match="no entry for tensor 'v'"):
        methods.slerp({"w": t(1.0), "v": t(1.0)}, {"w": t(2.0), "v": t(2.0)}, {"w": 0.5})
    with pytest.raises(MergeError, match="'linear' or 'ties', got 'mean'"):
        methods.dare_tensors(t(0.0), [t(1.0)], [1.0], 0.5, torch.Generator(), combine="mean")
    for merge in (methods.ties, lambda b, m, w: methods.dare(b, m, w, density=0.5, seed=0)):
        with pytest.raises(IncompatibleModelsError, match="in base but"):  # the base is checked like a model
            merge({"w": t(0.0, 0.0)}, [{"w": t(1.0)}], [1.0])
