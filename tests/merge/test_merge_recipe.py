"""Recipes: per-layer weights, validation, and YAML round trips that replay to identical weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.merge import MergeError, Recipe, apply_recipe, layer_index


def seeds(n_layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["a", "b", "c", "base"]
    out = {}
    for name in names:
        sd = {"tok_embeddings.weight": torch.randn(10, 4, generator=g)}
        for i in range(n_layers):
            sd[f"blocks.{i}.attn.wq.weight"] = torch.randn(4, 4, generator=g)
        sd["norm.weight"] = torch.randn(4, generator=g)
        sd["steps"] = torch.tensor(len(out))
        out[name] = sd
    return out


def test_layer_index_reads_blocks_and_layers_names():
    assert layer_index("blocks.3.attn.wq.weight") == 3
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("tok_embeddings.weight") is None
    assert layer_index("memory.slots.0.weight") is None


def test_per_layer_weights_apply_to_their_layer_only():
    sds = seeds()
    recipe = Recipe(
        method="linear",
        models=("a", "b", "c"),
        weights=(1.0, 1.0, 1.0),
        layer_weights={1: (0.0, 1.0, 0.0), 2: (1.0, 0.0, 3.0)},
    )
    merged = apply_recipe(recipe, sds)
    a, b, c = sds["a"], sds["b"], sds["c"]
    torch.testing.assert_close(
        merged["blocks.0.attn.wq.weight"],
        (a["blocks.0.attn.wq.weight"] + b["blocks.0.attn.wq.weight"] + c["blocks.0.attn.wq.weight"]) / 3,
    )
    assert torch.equal(merged["blocks.1.attn.wq.weight"], b["blocks.1.attn.wq.weight"])
    torch.testing.assert_close(
        merged["blocks.2.attn.wq.weight"],
        (a["blocks.2.attn.wq.weight"] + 3 * c["blocks.2.attn.wq.weight"]) / 4,
    )
    torch.testing.assert_close(
        merged["norm.weight"], (a["norm.weight"] + b["norm.weight"] + c["norm.weight"]) / 3
    )
    assert merged["steps"].item() == 0  # from the first model


def test_slerp_recipe_reads_its_weights_as_the_fraction_towards_the_second_model():
    sds = seeds()
    recipe = Recipe(method="slerp", models=("a", "b"), weights=(3.0, 1.0), layer_weights={0: (0.0, 1.0)})
    merged = apply_recipe(recipe, sds)
    assert torch.equal(merged["blocks.0.attn.wq.weight"], sds["b"]["blocks.0.attn.wq.weight"])
    x, y = sds["a"]["norm.weight"], sds["b"]["norm.weight"]
    assert not torch.allclose(merged["norm.weight"], x) and not torch.allclose(merged["norm.weight"], y)


RECIPES = [
    Recipe(
        method="linear", models=("a", "b", "c"), weights=(0.1, 0.7, 0.2), layer_weights={0: (1 / 3, 0.5, 0.9)}
    ),
    Recipe(method="slerp", models=("c", "a"), weights=(0.3, 0.7)),
    Recipe(
        method="ties", models=("a", "b", "c"), base="base", weights=(0.4, 0.35, 0.25), params={"density": 0.3}
    ),
    Recipe(
        method="dare",
        models=("a", "b", "c"),
        base="base",
        weights=(0.5, 0.5, 0.5),
        layer_weights={2: (0.0, 0.2, 0.8)},
        params={"density": 0.6, "combine": "ties"},
        seed=1234,
    ),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.method)
def test_recipe_yaml_round_trip_replays_to_identical_weights(recipe, tmp_path):
    sds = seeds()
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    loaded = Recipe.load(path)
    assert loaded == recipe
    original, replayed = apply_recipe(recipe, sds), apply_recipe(loaded, sds)
    assert original.keys() == replayed.keys()
    assert all(torch.equal(original[k], replayed[k]) for k in original)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=3, max_size=3).filter(
        lambda w: sum(w) > 0.01
    )
)
def test_arbitrary_float_weights_survive_the_yaml_round_trip(tmp_path_factory, weights):
    recipe = Recipe(method="linear", models=("a", "b", "c"), weights=tuple(weights))
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    recipe.save(path)
    assert Recipe.load(path).weights == recipe.weights


def test_saved_recipe_spells_out_default_parameters(tmp_path):
    path = tmp_path / "r.yaml"
    Recipe(method="ties", models=("a", "b"), base="base", weights=(1.0, 1.0)).save(path)
    text = path.read_text()
    assert "density: 0.5" in text and "normalize: true" in text and "scale: 1.0" in text


def test_invalid_recipes_name_every_bad_field():
    with pytest.raises(MergeError) as error:
        Recipe(
            method="ties",
            models=("a", "b"),
            weights=(1.0,),
            layer_weights={0: (1.0, 2.0, 3.0)},
            params={"density": 2.0, "t": 0.5},
        )
    message = str(error.value)
    for fragment in [
        "needs a base",
        "weights has 1 entries for 2 models",
        "layer_weights[0]",
        "density",
        "['t']",
    ]:
        assert fragment in message
    with pytest.raises(MergeError, match="slerp merges exactly 2 models"):
        Recipe(method="slerp", models=("a", "b", "c"), weights=(1.0, 1.0, 1.0))
    with pytest.raises(MergeError, match="method must be one of"):
        Recipe(method="soup", models=("a",), weights=(1.0,))


def test_unknown_yaml_fields_and_missing_models_are_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: linear\nmodels: [a]\nweights: [1.0]\nwieghts: [2.0]\n")
    with pytest.raises(MergeError, match="unknown field"):
        Recipe.load(path)
    recipe = Recipe(method="linear", models=("a", "zzz"), weights=(1.0, 1.0))
    with pytest.raises(MergeError, match=r"\['zzz'\] that were not given"):
        apply_recipe(recipe, seeds())


def test_weights_for_a_layer_the_models_lack_are_an_error():
    recipe = Recipe(method="linear", models=("a", "b"), weights=(1.0, 1.0), layer_weights={7: (1.0, 0.0)})
    with pytest.raises(MergeError, match=r"layer\(s\) \[7\] but the models have layers \[0, 1, 2\]"):
        apply_recipe(recipe, seeds())
