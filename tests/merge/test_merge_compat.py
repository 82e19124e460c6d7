"""Models with different architectures or vocabularies are refused with one error that says what differs."""

import pytest
import torch

from cognate.merge import Recipe, apply_recipe, check_compatible, linear, tokenizer_hash
from cognate.merge.compat import IncompatibleModelsError


def model(vocab=100, d=8, ffn=16, n_layers=2, dtype=torch.float32):
    sd = {"tok_embeddings.weight": torch.zeros(vocab, d, dtype=dtype)}
    for i in range(n_layers):
        sd[f"blocks.{i}.ffn.w1.weight"] = torch.zeros(ffn, d, dtype=dtype)
        sd[f"blocks.{i}.norm.weight"] = torch.ones(d, dtype=dtype)
    sd["lm_head.weight"] = torch.zeros(vocab, d, dtype=dtype)
    return sd


def test_identical_architectures_pass():
    check_compatible({"a": model(), "b": model(), "c": model()})


def test_different_vocabularies_are_named_as_such():
    with pytest.raises(IncompatibleModelsError) as error:
        check_compatible({"a": model(vocab=100), "b": model(vocab=120)})
    message = str(error.value)
    assert "different vocabularies" in message
    assert "tok_embeddings.weight has 100 rows (tokens) in a but 120 in b" in message
    assert "different shapes" not in message  # the vocabulary explains these shapes already


def test_different_tokenizers_with_equal_shapes_are_caught_by_hash(tmp_path):
    for name, vocab in [("a", {"x": 0}), ("b", {"y": 0})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(str(vocab))
    hashes = {name: tokenizer_hash(tmp_path / name) for name in "ab"}
    with pytest.raises(IncompatibleModelsError, match="different tokenizers"):
        check_compatible({"a": model(), "b": model()}, tokenizer_hashes=hashes)
    check_compatible({"a": model(), "b": model()}, tokenizer_hashes={"a": hashes["a"], "b": hashes["a"]})


def test_different_shapes_name_the_tensor_and_both_shapes():
    with pytest.raises(IncompatibleModelsError) as error:
        check_compatible({"a": model(ffn=16), "b": model(ffn=32)})
    message = str(error.value)
    assert "blocks.0.ffn.w1.weight is (16, 8) in a but (32, 8) in b" in message
    assert "blocks.1.ffn.w1.weight" in message


def test_different_layer_counts_list_the_missing_tensors():
    with pytest.raises(IncompatibleModelsError) as error:
        check_compatible({"a": model(n_layers=3), "b": model(n_layers=2)})
    assert "b lacks 2 tensor(s) that a has: blocks.2.ffn.w1.weight, blocks.2.norm.weight" in str(error.value)


def test_different_dtypes_are_reported():
    with pytest.raises(
        IncompatibleModelsError, match=r"norm.weight is torch.float32 in a but torch.bfloat16 in b"
    ):
        check_compatible({"a": model(), "b": model(dtype=torch.bfloat16)})


def test_merging_incompatible_models_fails_before_any_arithmetic():
    with pytest.raises(IncompatibleModelsError, match="different vocabularies"):
        linear([model(vocab=100), model(vocab=50)], [1.0, 1.0])
    recipe = Recipe(method="linear", models=("a", "b"), weights=(1.0, 1.0))
    with pytest.raises(IncompatibleModelsError, match=r"in a but .* in b"):
        apply_recipe(recipe, {"a": model(ffn=16), "b": model(ffn=8)})
