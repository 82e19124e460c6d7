"""lm-evaluation-harness on a tiny exported model: `cognate eval --lm-eval` writes our held-out examples as local
tasks, lm-eval generates the same completions as our evaluation (batched, so left-padded), and its metric config
scores them. Skipped where the `lmeval` extra is not installed."""

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from model_testing import small_tokenizer_and_config

from cognate.cli import main
from cognate.data.tokenizer import load_tokenizer
from cognate.eval import lm_eval_tasks
from cognate.eval.evaluate import MATH_STOPS
from cognate.eval.tasks import Example
from cognate.export.model_dir import save_model_dir
from cognate.model.model import CognateModel

NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("offline_one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer, config = small_tokenizer_and_config(seed=9, mem_chunk_size=8, max_seq_len=256)
    torch.manual_seed(0)
    model = CognateModel(config)
    # Blocks scaled up so greedy tokens depend on the whole prompt (a fresh small model's ignore all but the last
    # few tokens, which would hide a missing beginning of sequence or a padding error).
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("layers.") and parameter.dim() == 2:
                parameter.mul_(20.0)
    return save_model_dir(model, tmp_path_factory.mktemp("lm_eval") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    tasks_dir = tmp_path_factory.mktemp("tasks")
    out = tasks_dir / "report.json"
    argv = ["eval", "--model", str(model_dir), "--max-examples", "3", "--max-new-tokens", str(NEW_TOKENS)]
    argv += ["--lm-eval", str(tasks_dir), "--lm-eval-batch-size", "3", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_lm_eval_generates_our_completions_on_the_written_math_task(report):
    task = report["lm_eval"]["tasks"]["cognate_math"]
    assert task["examples"] == 3
    assert task["same_completions"] == 1.0  # a left-padded batch of 3 prompts of different lengths
    assert set(task["lm_eval"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert task["ours"]["exact_match"] == report["math"]["exact_match"]


def test_lm_eval_scores_with_the_written_qa_metric(model_dir, report, tmp_path):
    """Gold answers that are, and are not, the completions: lm-eval's exact match must give one half."""
    special = load_tokenizer(model_dir).all_special_tokens
    predictions = report["math"]["sources"]["synthetic_arithmetic"]["predictions"][:2]
    # lm-eval decodes without special tokens; ours keeps them
    ours = [
        functools.reduce(lambda text, t: text.replace(t, ""), special, p["completion"]) for p in predictions
    ]
    written = Path(report["lm_eval"]["tasks_dir"]) / "cognate_math.jsonl"
    rows = [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()][:2]
    golds = [f"  {ours[0].upper()}.", "no such answer"]  # case, spaces and punctuation are ignored
    examples = [
        Example("check", row["id"], row["prompt"], row["prompt"], answers=(gold,))
        for row, gold in zip(rows, golds, strict=True)
    ]
    lm_eval_tasks.write_task(tmp_path, lm_eval_tasks.QA_TASK, examples, MATH_STOPS, NEW_TOKENS)
    figures, completions = lm_eval_tasks.run_lm_eval(
        model_dir / "hf_format", tmp_path, [lm_eval_tasks.QA_TASK], "cpu", batch_size=2
    )
    assert completions[lm_eval_tasks.QA_TASK] == ours
    assert figures[lm_eval_tasks.QA_TASK] == {"exact_match,none": 0.5}
