"""Every user error of every command is one `error: ...` line naming the setting or file, with exit status 2
(a setting or usage) or 1 (a file or the data), never a traceback, and nothing is written before settings are
checked."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cognate.cli import main
from cognate.export.model_dir import WEIGHTS, save_model_dir
from cognate.model.config import get_preset
from cognate.model.model import CognateModel

TINY = dict(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, mem_dim=16, act_hidden=8, vocab_size=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A good model folder, one with a truncated model.safetensors, one with a malformed config.json."""
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    good = save_model_dir(CognateModel(get_preset("tiny").replace(**TINY)), root / "good")
    truncated = shutil.copytree(good, root / "truncated")
    weights = (truncated / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    malformed = shutil.copytree(good, root / "malformed")
    (malformed / "config.json").write_text('{"hidden_size": 32,')
    (root / "bad.yaml").write_text("lr: [1,\n")
    return {"good": good, "truncated": truncated, "malformed": malformed, "root": root}


def _cases(folders: dict[str, Path]) -> list[tuple[list[str], int, str]]:
    """(arguments, exit status, text the error must contain)."""
    root, truncated, malformed = folders["root"], folders["truncated"], folders["malformed"]
    run = ["--out", str(root / "run")]
    cases = []
    for command in (["train", *run], ["pretrain", *run]):
        cases += [
            ([*command, "--preset", "no-such-preset"], 2, "no-such-preset"),
            ([*command, "--set", "no_such_key=1"], 2, "no_such_key"),
            ([*command, "--set", "lr=abc"], 2, "lr='abc'"),
            ([*command, "--set", "max_steps=abc"], 2, "max_steps='abc'"),
            ([*command, "--set", "d_model=abc"], 2, "d_model='abc'"),
            ([*command, "--set", "nokeyvalue"], 2, "nokeyvalue"),
            ([*command, "--config", str(root / "bad.yaml")], 2, "bad.yaml"),
            ([*command, "--config", str(root / "missing.yaml")], 1, "missing.yaml"),
            ([*command, "--set", f"init_from={truncated / WEIGHTS}"], 1, str(truncated / WEIGHTS)),
        ]
    cases.append((["train", *run, "--tensorboard"], 2, "--tensorboard"))
    (root / "badprep").mkdir(exist_ok=True)
    (root / "badprep" / "manifest.json").write_text("{")
    cases.append(
        (["train", *run, "--data", str(root / "badprep")], 1, str(root / "badprep" / "manifest.json"))
    )
    for folder, name in ((truncated, WEIGHTS), (malformed, "config.json")):
        cases += [
            (["eval", "--model", str(folder)], 1, str(folder / name)),
            (["generate", "--model", str(folder), "--prompt", "x"], 1, str(folder / name)),
            (
                ["merge", "--models", str(folders["good"]), str(folder), "--out", str(root / "m")],
                1,
                str(folder / name),
            ),
        ]
    cases += [
        (["eval", "--model", str(root / "nowhere")], 1, "nowhere"),
        (["merge", "--out", str(root / "m")], 2, "--models"),
        (
            [
                "merge",
                "--models",
                str(folders["good"]),
                "--density",
                "7",
                "--method",
                "ties",
                "--base",
                str(folders["good"]),
                "--out",
                str(root / "m"),
            ],
            2,
            "density",
        ),
    ]
    return cases


def test_every_user_error_is_one_line_with_its_exit_status(folders, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # the walk must not depend on whether TensorBoard happens to be installed here
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    for argv, status, named in _cases(folders):
        assert main(argv) == status, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (argv, err)
        assert not (folders["root"] / "run").exists(), (
            argv
        )  # nothing written before the settings were checked
        assert not (folders["root"] / "m").exists(), argv


def test_a_user_error_from_the_command_line_has_no_traceback(folders):
    command = [sys.executable, "-m", "cognate.cli", "train", "--out", str(folders["root"] / "run")]
    result = subprocess.run([*command, "--set", "max_steps=abc"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: invalid TrainConfig: max_steps='abc' must be an integer or null"
    assert not (folders["root"] / "run").exists()


def test_a_run_folder_holding_another_run_is_refused_in_one_line(folders, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": {}, "train": {}, "data": "elsewhere"}))
    data = tmp_path / "data"
    from cognate.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(out=data, builtin=True, short_len=64, long_len=256), log=lambda _: None)
    assert main(["train", "--data", str(data), "--out", str(run), "--device", "cpu", "--test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(run) in err and "--overwrite" in err and "\n" not in err
