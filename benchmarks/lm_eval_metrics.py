"""Our math exact match against lm-eval's (GSM8K's task config, as `cognate eval --lm-eval` writes it) on the reference
solutions of the held-out math documents: what an oracle model that reproduces the references would score.

    python benchmarks/lm_eval_metrics.py --source-dir ../shared/data [--max-examples 200]

Needs the lmeval extra. Prints one JSON line: per source, the examples and the share each metric scores correct,
plus examples where they disagree. A perfect model scores 1.0 under ours by construction; where lm-eval's strict or
flexible match scores less, its string comparison and our numeric one disagree on the same text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter

from cognate.data.readers import SkipLog
from cognate.eval.lm_eval_tasks import GSM8K_EXACT_MATCH, GSM8K_FILTERS
from cognate.eval.metrics import math_exact_match
from cognate.eval.tasks import MATH_SOURCES, HeldOutSplit, held_out_documents, math_example


def lm_eval_scores(completions: list[str], golds: list[str]) -> dict[str, list[bool]]:
    """Per filter of GSM8K's config, whether lm-eval's exact match counts each completion correct."""
    options = {
        k: v for k, v in GSM8K_EXACT_MATCH.items() if k not in ("metric", "aggregation", "higher_is_better")
    }
    scores = {}
    for entry in GSM8K_FILTERS:
        regex = next(step for step in entry["filter"] if step["function"] == "regex")
        extract = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        answers = [found[0] for found in extract.apply([[c] for c in completions], [{}] * len(completions))]
        scores[entry["name"]] = [
            bool(exact_match_hf_evaluate([a], [g], **options)["exact_match"])
            for a, g in zip(answers, golds, strict=True)
        ]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, required=True)
    parser.add_argument("--max-examples", type=int, default=200, help="held-out documents per source")
    args = parser.parse_args()
    report = {}
    for name in MATH_SOURCES:
        documents = held_out_documents(name, args.source_dir, HeldOutSplit(), SkipLog())[: args.max_examples]
        examples = [math_example(d) for d in documents]
        completions = [d.text[len(e.prompt) :] for d, e in zip(documents, examples, strict=True)]
        golds = [e.answers[0] for e in examples]
        ours = [math_exact_match(c, g) for c, g in zip(completions, golds, strict=True)]
        theirs = lm_eval_scores(completions, golds)
        disagree = [i for i in range(len(golds)) if ours[i] != theirs["strict-match"][i]]
        report[name] = {
            "examples": len(golds),
            "ours": sum(ours) / len(ours),
            **{f"lm_eval_{k}": sum(v) / len(v) for k, v in theirs.items()},
            "disagreements": [{"gold": golds[i], "end": completions[i][-40:]} for i in disagree[:3]],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
