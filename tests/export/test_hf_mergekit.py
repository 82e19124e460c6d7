"""What mergekit needs from hf_format/ (docs/merge.md, "Using mergekit"): it infers the layout of an unknown
architecture from the weight names, and writes the merged config with the config class's save_pretrained.
The parity tests run mergekit itself: CI installs it (.ci/run); elsewhere they skip where it is not installed."""

import os
import re

import pytest
import torch
from model_testing import small_tokenizer_and_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from cognate.export.hf import CODE_FILE, export_hf
from cognate.merge import Recipe, apply_recipe
from cognate.model.model import CognateModel

# mergekit/architecture/auto.py: the first `.{number}.` in a tensor name marks a stack of layers.
MERGEKIT_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Three hf_format/ folders: models perturbed from one shared initialisation, as merged seeds are, and that
    initialisation's folder (the base of TIES)."""
    tokenizer, config = small_tokenizer_and_config(3, n_layers=3, mem_chunk_size=16)
    assert config.act_enabled and config.mem_enabled  # every kind of tensor is exported
    torch.manual_seed(0)
    shared = CognateModel(config).state_dict()
    root = tmp_path_factory.mktemp("mergekit")
    base = export_hf(shared, config, root / "base", tokenizer)
    folders = []
    for seed in (42, 1337, 2023):
        noise = torch.Generator().manual_seed(seed)
        state = {name: t + 0.02 * torch.randn(t.shape, generator=noise) for name, t in shared.items()}
        folders.append(export_hf(state, config, root / f"seed-{seed}", tokenizer))
    return folders, config, base


def test_only_the_transformer_blocks_have_a_layer_number_in_their_weight_names(hf_dirs):
    folders, config, _ = hf_dirs
    names = load_file(folders[0] / "model.safetensors").keys()
    numbered = [name for name in names if MERGEKIT_LAYER_INDEX.search(name)]
    stacks = {name[: MERGEKIT_LAYER_INDEX.search(name).start()] for name in numbered}
    assert stacks == {"model.layers"}, "mergekit would infer a second stack of layers"
    templates = {}
    for name in numbered:
        index = int(MERGEKIT_LAYER_INDEX.search(name).group(1))
        templates.setdefault(index, set()).add(MERGEKIT_LAYER_INDEX.sub(".{i}.", name, count=1))
    assert sorted(templates) == list(range(config.n_layers))
    assert all(t == templates[0] for t in templates.values()), "every layer must hold the same tensors"


def test_the_config_saved_by_transformers_carries_the_model_code(hf_dirs, tmp_path):
    # mergekit writes the merged config.json with save_pretrained, which copies the config class's file only.
    folder = hf_dirs[0][0]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.save_pretrained(tmp_path)
    assert (tmp_path / CODE_FILE).read_text() == (folder / CODE_FILE).read_text()
    assert config.architectures == ["CognateForCausalLM"]


def _mergekit(tmp_path, merge: dict):
    """Run mergekit in this process on a configuration (float32); the merged weights.

    Skips where mergekit is not installed, unless COGNATE_REQUIRE_MERGEKIT=1 (CI installs it): then it fails."""
    if os.environ.get("COGNATE_REQUIRE_MERGEKIT") != "1":
        pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    torch.set_num_threads(1)
    configuration = MergeConfiguration.model_validate({**merge, "dtype": "float32"})
    run_merge(configuration, str(tmp_path / "out"), options=MergeOptions(trust_remote_code=True, quiet=True))
    return load_file(tmp_path / "out" / "model.safetensors")


def _models(folders, weights, **extra) -> list[dict]:
    return [
        {"model": str(f), "parameters": {"weight": w, **extra}} for f, w in zip(folders, weights, strict=True)
    ]


# mergekit configuration, the same merge as a Cognate recipe over (A, B, C, base), and the largest difference
# docs/merge.md states ("Compared with cognate merge").
PARITY = {
    "linear 1/1/1": (
        lambda f, base: {"merge_method": "linear", "models": _models(f, [1.0, 1.0, 1.0])},
        Recipe("linear", ("A", "B", "C"), (1.0, 1.0, 1.0)),
        1.2e-7,
    ),
    "linear 0.5/0.3/0.2": (
        lambda f, base: {"merge_method": "linear", "models": _models(f, [0.5, 0.3, 0.2])},
        Recipe("linear", ("A", "B", "C"), (0.5, 0.3, 0.2)),
        1.2e-7,
    ),
    "linear per layer": (  # a weight list is a gradient over the layers; loose tensors take its first value
        lambda f, base: {
            "merge_method": "linear",
            "models": _models(f[:2], [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]),
        },
        Recipe("linear", ("A", "B"), (1.0, 0.0), layer_weights={1: (0.5, 0.5), 2: (0.0, 1.0)}),
        1.2e-7,
    ),
    "slerp t=0.3": (
        lambda f, base: {
            "merge_method": "slerp",
            "base_model": str(f[0]),
            "models": [{"model": str(f[0])}, {"model": str(f[1])}],
            "parameters": {"t": 0.3},
        },
        Recipe("slerp", ("A", "B"), (0.7, 0.3)),
        6e-8,  # one float32 rounding of the largest entries (embeddings near 0.5)
    ),
    "ties density 0.5": (
        lambda f, base: {
            "merge_method": "ties",
            "base_model": str(base),
            "models": _models(f, [1.0, 0.6, 0.3], density=0.5),
            "parameters": {"normalize": True},
        },
        Recipe("ties", ("A", "B", "C"), (1.0, 0.6, 0.3), base="base", params={"density": 0.5}),
        0.0,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", PARITY)
def test_mergekit_gives_the_weights_of_the_same_cognate_merge(hf_dirs, tmp_path, case):
    folders, _, base = hf_dirs
    mergekit_merge, recipe, documented = PARITY[case]
    merged = _mergekit(tmp_path, mergekit_merge(folders, base))
    states = {name: load_file(f / "model.safetensors") for name, f in zip("ABC", folders)}
    expected = apply_recipe(recipe, {**states, "base": load_file(base / "model.safetensors")})
    assert merged.keys() == expected.keys()
    gaps = {name: (merged[name] - tensor).abs().max().item() for name, tensor in expected.items()}
    assert max(gaps.values()) <= documented, max(gaps, key=gaps.get)


@pytest.mark.slow
def test_mergekit_dare_ties_changes_as_many_entries_by_as_much_as_cognate_dare(hf_dirs, tmp_path):
    # The masks differ by design (mergekit draws them from torch's global RNG and rescales to the L1 norm), so
    # the comparison is statistical: with density 0.5 over three models about 7/8 of the entries move.
    folders, _, base = hf_dirs
    torch.manual_seed(0)
    merged = _mergekit(
        tmp_path,
        {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": _models(folders, [1.0, 1.0, 1.0], density=0.5),
            "parameters": {"normalize": True},
        },
    )
    states = {name: load_file(f / "model.safetensors") for name, f in zip("ABC", folders)}
    base_state = load_file(base / "model.safetensors")
    recipe = Recipe(
        "dare",
        ("A", "B", "C"),
        (1.0, 1.0, 1.0),
        base="base",
        params={"density": 0.5, "combine": "ties", "normalize": True},
    )
    ours = apply_recipe(recipe, {**states, "base": base_state})

    def moved(state):
        deltas = torch.cat([(state[name] - base_state[name]).flatten() for name in base_state])
        return (deltas != 0).float().mean().item(), deltas.abs().mean().item()

    (their_fraction, their_size), (our_fraction, our_size) = moved(merged), moved(ours)
    assert our_fraction == pytest.approx(0.875, abs=0.01) and their_fraction == pytest.approx(0.875, abs=0.01)
    assert our_size == pytest.approx(their_size, rel=0.03)


@pytest.mark.slow
def test_a_mergekit_merge_loads_with_transformers_and_carries_the_tokenizer(hf_dirs, tmp_path):
    folders, config, _ = hf_dirs
    _mergekit(tmp_path, {"merge_method": "linear", "models": _models(folders, [0.5, 0.3, 0.2])})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, config.vocab_size, (1, 80))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert (tmp_path / "out" / "tokenizer.json").exists()
