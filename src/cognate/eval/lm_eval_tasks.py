"""lm-evaluation-harness on `cognate eval`'s own held-out examples: the same prompts, lm-eval's metrics.

`cognate eval --lm-eval DIR` writes the examples its math and QA sections scored as local lm-eval tasks in DIR (one
JSONL file and one task YAML each), runs lm-eval's `hf` model on the folder's Hugging Face layout, and puts lm-eval's
figures beside ours in the report (section `lm_eval`). The tasks stand alone too:

    lm_eval --model hf --model_args pretrained=MODEL/hf_format,trust_remote_code=True,add_bos_token=True \\
        --include_path DIR --tasks cognate_math,cognate_qa --batch_size 8

The prompts are ours; `add_bos_token=True` puts the end-of-text token before each, as `cognate eval` does, and
greedy decoding with the same stop strings and token budgets gives the same completions. The metrics are lm-eval's:
    cognate_math  GSM8K's task config: exact_match after `strict-match` (the number after `####`) and after
                  `flexible-extract` (the last number), commas, `$` and a final period ignored. Ours compares the
                  numbers' values (5 = 5.0; 1/3 to four decimals).
    cognate_qa    exact_match of the first line, ignoring case, punctuation, the articles a/an/the and whitespace.
                  Ours is SQuAD's normalisation (the same, but whitespace collapsed rather than dropped), plus F1.
lm-eval is an optional extra: `pip install 'cognate[lmeval]'`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from cognate.eval.tasks import Example

MATH_TASK, QA_TASK = "cognate_math", "cognate_qa"
EXTRA_HINT = "pip install 'cognate[lmeval]' (lm_eval[hf]>=0.4)"

# GSM8K's lm-eval task config (lm_eval/tasks/gsm8k/gsm8k.yaml): its answer extraction and exact match.
GSM8K_FILTERS = [
    {
        "name": "strict-match",
        "filter": [
            {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
            {"function": "take_first"},
        ],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"},
        ],
    },
]
GSM8K_EXACT_MATCH = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
QA_EXACT_MATCH = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": True,
    "regexes_to_ignore": ["(?i)\\b(a|an|the)\\b", "\\s+"],
}


def task_config(name: str, data_file: Path, stops: Sequence[str], max_new_tokens: int) -> dict:
    math = name == MATH_TASK
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": list(stops),
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_new_tokens,
        },
        "metric_list": [GSM8K_EXACT_MATCH if math else QA_EXACT_MATCH],
        "metadata": {"version": 1.0},
    }
    if math:
        config["filter_list"] = GSM8K_FILTERS
    return config


def write_task(
    folder: Path, name: str, examples: Sequence[Example], stops: Sequence[str], max_new_tokens: int
) -> None:
    """DIR/{name}.jsonl (id, source, prompt, answer) and DIR/{name}.yaml, a task lm-eval finds with --include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = (folder / f"{name}.jsonl").resolve()
    rows = [{"id": e.id, "source": e.source, "prompt": e.prompt, "answer": e.answers[0]} for e in examples]
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = task_config(name, data_file, stops, max_new_tokens)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def run_lm_eval(
    hf_folder: Path, task_dir: Path, tasks: Sequence[str], device: str, batch_size: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """lm-eval on `tasks` (written by `write_task` in `task_dir`): its figures {task: {"metric,filter": value}}
    and its completions {task: [completion of each example, in file order]}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"--lm-eval needs lm-evaluation-harness: {EXTRA_HINT}") from error

    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(hf_folder),
            "trust_remote_code": True,
            "add_bos_token": True,
            "dtype": "float32",
            "device": device,
        },
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        log_samples=True,
    )
    figures = {
        task: {key: float(value) for key, value in results.items() if "," in key and "stderr" not in key}
        for task, results in output["results"].items()
    }
    # One sample per example and filter; the response is the same under every filter.
    completions = {
        task: list(
            {s["doc_id"]: s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])}.values()
        )
        for task, samples in output["samples"].items()
    }
    return figures, completions
