"""`cognate merge` over model folders: a method writes a loadable model folder and a recipe that replays to the
same weights; models of different architectures are refused with a clear error."""

import re

import pytest
import torch
from safetensors.torch import load_file

from cognate.cli import main
from cognate.data import synthetic
from cognate.data.tokenizer import train_tokenizer
from cognate.export.model_dir import load_model_dir, save_model_dir
from cognate.model.config import get_preset
from cognate.model.model import CognateModel


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    texts = [d.text for docs in synthetic.generate(seed=5).values() for d in docs][:200]
    tokenizer = train_tokenizer(texts, vocab_size=350)
    config = get_preset("tiny").replace(
        vocab_size=len(tokenizer), d_model=32, n_heads=2, n_layers=2, ffn_hidden=64, mem_dim=16
    )
    root = tmp_path_factory.mktemp("merge")
    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        paths.append(save_model_dir(CognateModel(config), root / f"m{seed}", tokenizer=tokenizer))
    torch.manual_seed(9)
    wider = save_model_dir(CognateModel(config.replace(ffn_hidden=96)), root / "wider", tokenizer=tokenizer)
    return paths, wider, root


def test_linear_merge_writes_a_model_folder_and_a_replayable_recipe(folders):
    paths, _, root = folders
    out = root / "linear"
    assert (
        main(
            [
                "merge",
                "--models",
                *map(str, paths),
                "--method",
                "linear",
                "--weights",
                "1",
                "2",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    merged = load_file(out / "model.safetensors")
    states = [load_file(p / "model.safetensors") for p in paths]
    name = "layers.1.ffn.up.weight"
    assert torch.allclose(merged[name], (states[0][name] + 2 * states[1][name] + states[2][name]) / 4)
    assert (out / "hf_format" / "modeling_cognate.py").is_file()
    load_model_dir(out)  # the merged folder is a model folder like a seed's

    replay = root / "replay"
    assert main(["merge", "--recipe", str(out / "recipe.yaml"), "--out", str(replay)]) == 0
    again = load_file(replay / "model.safetensors")
    assert all(torch.equal(merged[k], again[k]) for k in merged)


def test_models_of_different_architectures_are_refused(folders, capsys):
    paths, wider, root = folders
    argv = ["merge", "--models", str(paths[0]), str(wider), "--method", "linear", "--out", str(root / "x")]
    assert main(argv) == 1
    assert re.search(
        r"^error: models cannot be merged: .*layers\.0\.ffn\.up\.weight", capsys.readouterr().err
    )
