"""`cognate merge` over model folders: a method writes a loadable model folder and a recipe that replays to the
same weights; models of different architectures are refused with a clear error."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from cognate.cli import main
from cognate.data import synthetic
from cognate.data.prepare import PrepareConfig, prepare
from cognate.data.tokenizer import load_tokenizer, train_tokenizer
from cognate.export.model_dir import load_model_dir, save_model_dir
from cognate.merge import Recipe
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


def test_evolve_from_the_command_line_writes_the_best_recipe_and_its_history(tmp_path, capsys):
    # Two untrained models that share a prepared data folder's tokenizer; the fitness is the validation loss on
    # that folder. Budget 5: the three reference candidates (the average, each model), then two CMA-ES proposals.
    data = tmp_path / "data"
    prepare(PrepareConfig(out=data, builtin=True, short_len=64, long_len=256), log=lambda _: None)
    tokenizer = load_tokenizer(data)
    config = get_preset("tiny").replace(
        vocab_size=len(tokenizer), d_model=32, n_heads=2, n_layers=2, ffn_hidden=64, mem_dim=16
    )
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(save_model_dir(CognateModel(config), tmp_path / f"m{seed}", tokenizer=tokenizer))
    out = tmp_path / "evolved"
    argv = ["merge", "--models", *map(str, paths), "--evolve", "--data", str(data), "--budget", "5"]
    assert main([*argv, "--eval-batches", "1", "--out", str(out)]) == 0

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = json.loads((out / "evolve_history.json").read_text())
    assert len(history) == 5 and [c["kind"] for c in history[:3]] == ["reference"] * 3
    best = min(history, key=lambda c: c["fitness"])
    assert printed["val_loss"] == pytest.approx(
        best["fitness"], rel=1e-6
    )  # the written model is the best one
    assert Recipe.load(out / "recipe.yaml") == Recipe.from_dict(best["recipe"])
    load_model_dir(out)
    replay = tmp_path / "replay"
    assert main(["merge", "--recipe", str(out / "recipe.yaml"), "--out", str(replay)]) == 0
    merged, again = (load_file(folder / "model.safetensors") for folder in (out, replay))
    assert all(torch.equal(merged[name], again[name]) for name in merged)
    assert main(["merge", "--models", *map(str, paths), "--evolve", "--out", str(tmp_path / "x")]) == 2
    assert "error: --evolve needs --data" in capsys.readouterr().err
