"""`cognate bench ablation`: the arms are what they say, the families are labelled right, one JSON line."""

import contextlib
import json

import numpy as np
import pytest
from model_testing import random_tokens, small_model

from cognate.bench.ablation import ARMS, ValidationRows, arm_overrides, score, validation_rows
from cognate.cli import main
from cognate.data.tokenizer import load_tokenizer
from cognate.eval.tasks import solution_targets
from cognate.model.config import get_preset


def test_each_arm_switches_off_exactly_what_its_name_says():
    preset = get_preset("tiny")
    configs = {arm: preset.replace(**arm_overrides(arm, preset)) for arm in ARMS}
    assert (configs["plain"].t_train, configs["plain"].t_infer) == (1, 1)
    assert not configs["plain"].act_enabled and not configs["plain"].mem_enabled
    assert configs["recursion"].t_train == preset.t_train > 1
    assert not configs["recursion"].act_enabled and not configs["recursion"].mem_enabled
    assert configs["act"].act_enabled and not configs["act"].mem_enabled
    assert configs["memory"].mem_enabled and not configs["memory"].act_enabled
    assert configs["memory"].mem_kind == "slots" and configs["memory_neural"].mem_kind == "neural"
    assert configs["memory_neural"].mem_enabled and not configs["memory_neural"].act_enabled
    assert configs["full"] == preset


def test_validation_tokens_are_labelled_by_their_document_layout(builtin_data):
    tokenizer = load_tokenizer(builtin_data)
    short, long = validation_rows(builtin_data, n_short=16, n_long=1)
    assert (long.family == "qa").all()
    math = short.family == "math"
    assert math.any() and (short.family == "code").any()
    for row in range(len(short.input_ids)):
        ids = short.input_ids[row].numpy()
        flags = math[row]
        if not flags.any():
            continue
        # Each labelled math document starts with its layout's first line...
        starts = np.flatnonzero(flags & ~np.concatenate(([False], flags[:-1])))
        for start in starts:
            first = tokenizer.decode(ids[start : start + 4].tolist(), skip_special_tokens=True)
            assert first.lstrip().startswith("Problem")
        # ...and the answer positions predict the tokens after "Solution:", never the problem statement.
        answer = short.answer[row]
        if answer.any():
            assert answer[flags].sum() == answer.sum()
            predicted = tokenizer.decode(short.targets[row][answer].tolist())
            assert "Problem:" not in predicted and "Solution:" not in predicted


@pytest.mark.slow
def test_command_trains_the_arms_and_prints_one_json_line(builtin_data, tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["bench", "ablation", "--json", "--data", str(builtin_data), "--out", str(out)]
    args += ["--budget", "tokens", "--tokens", "1024", "--arms", "plain", "full", "--threads", "1"]
    args += ["--eval-interval", "2", "--eval-batches", "1", "--val-short-rows", "8", "--val-long-rows", "1"]
    args += ["--set", "t_train=2", "--set", "grad_steps=1"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["budget"] == "tokens" and set(result["arms"]) == {"plain", "full"}
    assert result["settings"]["model_overrides"] == {"t_train": 2, "grad_steps": 1}
    plain, full = result["arms"]["plain"], result["arms"]["full"]
    assert full["model"]["t_train"] == 2 and plain["model"]["t_train"] == 1  # the arm's own switches win
    assert plain["tokens"] == full["tokens"] == 1024
    assert plain["parameters"] == full["parameters"]  # every arm has the same tensors (mergeable)
    assert full["flops_per_token"] > 1.8 * plain["flops_per_token"]  # full runs t_train steps
    assert plain["act_mean_steps"] == 1.0 and plain["act_var_steps"] == 0.0
    # Halting is scored at the threshold calibrated on validation data, within the loss budget.
    calibration = full["halting_calibration"]
    assert plain["halting_calibration"] is None and full["model"]["act_threshold"] == calibration["threshold"]
    assert calibration["loss_delta"] <= 0.03 or calibration["threshold"] == 0.95
    for arm in (plain, full):
        assert 0 < arm["val_loss"] < 20
        for family in ("math", "code", "qa", "math_answer"):
            loss, tokens = arm[f"val_loss_{family}"], arm[f"val_tokens_{family}"]
            assert (loss is None) == (tokens == 0) and (loss is None or 0 < loss < 20)
        assert arm["val_tokens_code"] > 0 and arm["val_tokens_qa"] > 0
        assert arm["curve"] and all(point["seconds"] > 0 for point in arm["curve"])
        assert arm["inference_tokens_per_s"] > 0
    assert (out / "ablation.png").stat().st_size > 0


def test_the_math_answer_is_what_follows_solution(builtin_data):
    tokenizer = load_tokenizer(builtin_data)
    text = "Problem: Ann has 3 pens and buys 4 more. How many pens?\nSolution:\n3 + 4 = 7\n#### 7"
    ids, scored = solution_targets(text, tokenizer)
    # Position i is scored on token i + 1: the scored targets are exactly the worked answer.
    predicted = tokenizer.decode([ids[i + 1] for i in np.flatnonzero(scored)])
    assert predicted.strip() == "3 + 4 = 7\n#### 7"


def test_a_set_that_is_not_a_model_setting_is_one_error_line(capsys, tmp_path):
    assert main(["bench", "ablation", "--out", str(tmp_path), "--set", "lr=3e-4"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set lr: not a model setting"


@pytest.mark.parametrize("memory", [True, False])
def test_a_long_document_is_scored_with_the_memory_its_earlier_rows_left(memory):
    """Two long rows of one document: the second is read with the first one's memory, so its loss differs from
    reading it alone exactly when the model has a memory."""
    model = small_model(mem_enabled=memory, mem_chunk_size=8)
    ids = random_tokens(2, 64)
    labels = np.full(ids.shape, "qa", dtype=object)

    def qa_loss(documents) -> float:
        rows = ValidationRows("long", ids, ids, labels, np.zeros(ids.shape, dtype=bool), np.array(documents))
        return score(model, [rows], batch_size=4, autocast=contextlib.nullcontext)["val_loss_qa"]

    one_document, two_documents = qa_loss([[0, 0], [0, 1]]), qa_loss([[-1, 0], [-1, 0]])
    assert (one_document != two_documents) == memory
