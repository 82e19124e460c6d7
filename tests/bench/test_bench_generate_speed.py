"""`cognate bench generate`: one JSON line of generation speeds, and the same greedy tokens from every path."""

import json

import pytest
import torch

from cognate.cli import main
from cognate.export.model_dir import save_model_dir
from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train.data import tokenizer_vocab_size


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def bench(capsys, *argv: str) -> dict:
    assert main(["bench", "generate", "--json", "--threads", "1", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_command_prints_the_figures_as_one_json_line(capsys):
    report = bench(capsys, "--preset", "tiny", "--prompt-len", "16", "--new-tokens", "4")
    for key in ("cached_tokens_per_s", "uncached_tokens_per_s", "hf_tokens_per_s"):
        assert report[key] > 0
    assert report["cache_speedup"] == pytest.approx(
        report["cached_tokens_per_s"] / report["uncached_tokens_per_s"]
    )
    assert report["hf_vs_native"] == pytest.approx(report["hf_tokens_per_s"] / report["cached_tokens_per_s"])
    assert isinstance(report["same_tokens"], bool)
    assert (report["hf_uncached_tokens_per_s"] is None) == (not report["hf_uses_kv_cache"])
    settings = report["settings"]
    assert (settings["model"], settings["prompt_len"], settings["new_tokens"]) == ("fresh tiny", 16, 4)
    assert settings["decoding"] == "greedy" and settings["threads"] == 1


def test_cached_uncached_and_exported_generation_give_the_same_tokens(capsys, tmp_path):
    # Short memory chunks and a strong memory read, so that memory changes the tokens: an exported model that
    # generated without it (with memory off) would disagree with native generation.
    torch.manual_seed(0)
    model = CognateModel(get_preset("tiny").replace(mem_chunk_size=8))
    with torch.no_grad():
        for block in model.layers:
            block.memory_read.out.weight.mul_(300)
    save_model_dir(model, tmp_path / "model")
    sizes = ("--prompt-len", "24", "--new-tokens", "8", "--batch-size", "2")
    report = bench(capsys, "--model", str(tmp_path / "model"), *sizes)
    assert report["mismatched_arms"] == []
    assert report["same_tokens"] is True
    assert report["hf_uses_kv_cache"] is True  # the export reads one token per call after the prompt


def test_a_prompt_longer_than_the_model_allows_is_refused():
    too_long = str(get_preset("tiny").max_seq_len)
    with pytest.raises(SystemExit, match="max_seq_len"):
        main(["bench", "generate", "--json", "--preset", "tiny", "--prompt-len", too_long])


def test_halting_is_timed_and_its_loss_measured_against_forcing_every_step(capsys, tmp_path, builtin_data):
    data = builtin_data
    torch.manual_seed(0)
    model = CognateModel(get_preset("tiny").replace(vocab_size=tokenizer_vocab_size(data)))
    with torch.no_grad():  # an untrained halting head that sends tokens to different steps
        model.halting.out.weight.normal_(std=3.0)
        model.halting.out.bias.zero_()
    save_model_dir(model, tmp_path / "model")
    sizes = ("--prompt-len", "16", "--new-tokens", "8")
    report = bench(capsys, "--model", str(tmp_path / "model"), "--data", str(data), *sizes)
    assert report["halting_tokens_per_s"] > 0 and report["forced_tokens_per_s"] > 0
    assert report["halting_speedup"] == pytest.approx(
        report["halting_tokens_per_s"] / report["forced_tokens_per_s"]
    )
    assert 1 < report["halting_mean_steps"] < model.cfg.t_infer
    # Untrained, halting changes the loss (a little: the steps of a fresh model barely differ), never by nothing.
    assert report["halting_loss_delta"] != 0 and abs(report["halting_loss_delta"]) < 1
    assert report["halting_data"] == str(data) and report["halting_prompt"] == "validation"
