"""What mergekit needs from hf_format/ (docs/merge.md, "Using mergekit"): it infers the layout of an unknown
architecture from the weight names, and writes the merged config with the config class's save_pretrained.
The last test runs mergekit itself and skips where it is not installed (CI)."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from cognate.data import synthetic
from cognate.data.tokenizer import train_tokenizer
from cognate.export.hf import CODE_FILE, export_hf
from cognate.merge import Recipe, apply_recipe
from cognate.model.config import get_preset
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
    """Three hf_format/ folders: models perturbed from one shared initialisation, as merged seeds are."""
    texts = [d.text for docs in synthetic.generate(seed=3).values() for d in docs][:300]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    config = get_preset("tiny").replace(
        vocab_size=len(tokenizer),
        d_model=32,
        n_heads=2,
        n_layers=3,
        ffn_hidden=64,
        mem_dim=16,
        mem_chunk_size=16,
        mem_min_seq_len=64,
    )
    assert config.act_enabled and config.mem_enabled  # every kind of tensor is exported
    torch.manual_seed(0)
    shared = CognateModel(config).state_dict()
    root = tmp_path_factory.mktemp("mergekit")
    folders = []
    for seed in (42, 1337, 2023):
        noise = torch.Generator().manual_seed(seed)
        state = {name: t + 0.02 * torch.randn(t.shape, generator=noise) for name, t in shared.items()}
        folders.append(export_hf(state, config, root / f"seed-{seed}", tokenizer))
    return folders, config


def test_only_the_transformer_blocks_have_a_layer_number_in_their_weight_names(hf_dirs):
    folders, config = hf_dirs
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


@pytest.mark.slow
def test_mergekit_linear_merge_equals_cognate_merge_and_loads(hf_dirs, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    folders, config = hf_dirs
    weights = [0.5, 0.3, 0.2]
    merge = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, weights, strict=True)
            ],
            "dtype": "float32",
        }
    )
    torch.set_num_threads(1)
    run_merge(merge, str(tmp_path / "out"), options=MergeOptions(trust_remote_code=True, quiet=True))

    states = {str(f): load_file(f / "model.safetensors") for f in folders}
    expected = apply_recipe(Recipe("linear", tuple(states), tuple(weights)), states)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, config.vocab_size, (1, 80))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert (tmp_path / "out" / "tokenizer.json").exists()
