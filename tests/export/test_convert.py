"""`cognate convert` between the native model folder and the Hugging Face layout (hf_format/, a mergekit output),
and the commands that read either layout."""

import json
import shutil

import pytest
import torch
from model_testing import small_tokenizer_and_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cognate.cli import main
from cognate.eval.evaluate import EvalConfig, evaluate_model_dir
from cognate.export.model_dir import WEIGHTS, load_model_dir, save_model_dir, tokenizer_sha256
from cognate.model.model import CognateModel

pytestmark = pytest.mark.usefixtures("offline_one_thread")


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    tokenizer, config = small_tokenizer_and_config(seed=5, mem_chunk_size=16, max_seq_len=256)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("convert") / "native"
    return save_model_dir(CognateModel(config), folder, tokenizer=tokenizer, stats={"seed": 7})


def convert(source, out, to):
    assert main(["convert", "--model", str(source), "--to", to, "--out", str(out)]) == 0
    return out


def assert_same_weights(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_native_to_hf_to_native_gives_back_the_same_weights_tokenizer_and_config(native_dir, tmp_path):
    hf = convert(native_dir, tmp_path / "hf", "hf")
    assert_same_weights(load_file(native_dir / "hf_format" / WEIGHTS), load_file(hf / WEIGHTS))
    back = convert(hf, tmp_path / "back", "native")
    assert_same_weights(load_file(native_dir / WEIGHTS), load_file(back / WEIGHTS))
    assert (back / "tokenizer.json").read_bytes() == (native_dir / "tokenizer.json").read_bytes()
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (native_dir / "config.json").read_text()
    )
    assert json.loads((back / "training_stats.json").read_text())["converted_from"] == str(hf)
    again = convert(back, tmp_path / "again", "hf")
    assert_same_weights(load_file(hf / WEIGHTS), load_file(again / WEIGHTS))
    assert (again / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_a_sharded_bfloat16_save_of_the_export_converts_to_the_same_weights(native_dir, tmp_path):
    """What mergekit and `save_pretrained` write: the Hugging Face layout, sharded, in the merge's dtype."""
    model = AutoModelForCausalLM.from_pretrained(native_dir / "hf_format", trust_remote_code=True)
    saved = tmp_path / "saved"
    model.to(torch.bfloat16).save_pretrained(saved, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(native_dir / "hf_format" / name, saved / name)
    assert (saved / "model.safetensors.index.json").is_file()
    back = convert(saved, tmp_path / "back", "native")
    expected = {name: t.bfloat16().float() for name, t in load_file(native_dir / WEIGHTS).items()}
    assert_same_weights(expected, load_file(back / WEIGHTS))
    assert (back / "tokenizer.json").read_bytes() == (native_dir / "tokenizer.json").read_bytes()


def test_generate_and_eval_read_the_hf_layout_as_the_native_one(native_dir, capsys):
    hf = native_dir / "hf_format"
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(load_model_dir(hf)(ids).logits, load_model_dir(native_dir)(ids).logits)
    assert tokenizer_sha256(hf) == tokenizer_sha256(native_dir)  # the same data folder fits both
    args = ["--prompt", "Problem: 4 + 5", "--max-new-tokens", "8"]
    texts = []
    for folder in (native_dir, hf):
        assert main(["generate", "--model", str(folder), *args]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    config = EvalConfig(max_examples=2, math_new_tokens=4, sample_new_tokens=4)
    reports = [evaluate_model_dir(folder, config, log=lambda _: None) for folder in (native_dir, hf)]
    assert reports[0]["math"] == reports[1]["math"]
    assert reports[0]["model"]["tokenizer_sha256"] == reports[1]["model"]["tokenizer_sha256"]


def test_converting_into_a_folder_that_is_not_empty_is_an_error(native_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["convert", "--model", str(native_dir), "--to", "hf", "--out", str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.startswith("error: --out")
    assert main(["convert", "--model", str(tmp_path), "--to", "hf", "--out", str(tmp_path / "new")]) == 1
    assert "not a model folder" in capsys.readouterr().err
