"""`cognate bench optim`: a smoke run on a tiny prepared folder the test writes itself."""

import json

import pytest
import torch

from cognate.cli import main
from cognate.data.prepare import PrepareConfig, prepare


@pytest.fixture(autouse=True)
def restore_threads():
    """`--threads 1` sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_sources(folder):
    """Two sources in their published formats: GSM8K (short side) and NarrativeQA (long side)."""
    (folder / "gsm8k").mkdir(parents=True)
    (folder / "narrativeqa").mkdir(parents=True)
    math = [
        {
            "question": f"Tom has {i} apples and buys {i + 3} more. How many?",
            "answer": f"{i} + {i + 3}\n#### {2 * i + 3}",
        }
        for i in range(120)
    ]
    stories = [
        {
            "question": f"Where did hero {i} go?",
            "answer": [f"Town {i}.", "Away."],
            "passage": " ".join(f"Hero {i} walked {j} miles to town {i + j}." for j in range(20)),
        }
        for i in range(30)
    ]
    (folder / "gsm8k/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math))
    (folder / "narrativeqa/test-tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stories))


@pytest.mark.slow
def test_three_arms_report_a_validation_loss(tmp_path, capsys):
    write_sources(tmp_path / "sources")
    data = tmp_path / "data"
    config = PrepareConfig(
        out=data,
        source_dir=tmp_path / "sources",
        allow_missing=True,
        vocab_size=300,
        short_len=64,
        long_len=256,
    )
    prepare(config, log=lambda _: None)
    argv = [
        "bench",
        "optim",
        "--json",
        "--data",
        str(data),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--val-rows",
        "4",
    ]
    assert main([*argv, "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    losses = result["val_loss"]
    assert set(losses) == {"adamw", "muon", "mugrokfast"}
    assert all(0.0 < loss < 10.0 for loss in losses.values())
    assert losses["adamw"] != losses["muon"]  # different optimizers, different weights after 3 updates
    assert result["tokens"] == 3 * 2 * 64 and result["grokfast"]["warmup_steps"] == 1
