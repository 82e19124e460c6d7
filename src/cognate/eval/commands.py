"""`cognate eval`: measure one model folder and print the report as a table (and as JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cognate.train.precision import add_bf16_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="a model folder (config.json, weights, tokenizer)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="a prepared data folder with the model's tokenizer: validation perplexity, ACT and memory statistics",
    )
    parser.add_argument(
        "--source-dir",
        type=Path,
        help="the raw sources (e.g. ../shared/data): math EM, MBPP pass@1 and QA EM/F1 on held-out examples; "
        "default: math EM on built-in synthetic arithmetic only",
    )
    parser.add_argument("--max-examples", type=int, default=20, help="examples per dataset (default 20)")
    parser.add_argument(
        "--val-tokens",
        type=_tokens,
        default=65_536,
        help="validation row tokens to read, a fixed subset of the same short/long mix, or 'all' (default 65536)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="cap every generation at this many tokens (defaults: math and code 256, QA 32, collapse check 64)",
    )
    parser.add_argument(
        "--json",
        help="write the report as JSON to this file, or '-' for stdout (the table then goes to stderr)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_bf16_argument(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--lm-eval",
        type=Path,
        metavar="DIR",
        help="also run lm-evaluation-harness (the lmeval extra) on the same math and QA examples, written to DIR "
        "as local tasks, and report its figures beside ours",
    )
    parser.add_argument(
        "--lm-eval-batch-size",
        type=int,
        default=1,
        help="lm-eval's batch size (default 1; left-padded above)",
    )


def _tokens(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'all', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from cognate.eval.evaluate import EvalConfig, EvalError, evaluate_model_dir
    from cognate.train.precision import resolve_precision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = {}
    if args.max_new_tokens is not None:
        caps = dict.fromkeys(
            ("math_new_tokens", "code_new_tokens", "qa_new_tokens", "sample_new_tokens"), args.max_new_tokens
        )
    try:
        config = EvalConfig(
            data=args.data,
            source_dir=args.source_dir,
            max_examples=args.max_examples,
            val_tokens=args.val_tokens,
            # lm-eval runs the Hugging Face export in fp32: with --lm-eval, "auto" means fp32 here too, so the two
            # harnesses generate from the same numbers and their completions can be compared token for token.
            bf16=resolve_precision(False if args.lm_eval and args.bf16 == "auto" else args.bf16, device).bf16,
            lm_eval_dir=args.lm_eval,
            lm_eval_batch_size=args.lm_eval_batch_size,
            **caps,
        )
        report = evaluate_model_dir(args.model, config, device)
    except (EvalError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = format_report(report)
    if args.json == "-":
        print(table, file=sys.stderr)
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def format_report(report: dict) -> str:
    """The report as a table a person reads: one line per figure, sections in the report's order."""
    model = report["model"]
    lines = [
        f"{model['name']} ({model['parameters']:,} parameters; t_infer {model['t_infer']}, "
        f"ACT {_on(model['act_enabled'])}, memory {_on(model['mem_enabled'])})"
        + (f"  {model['path']}" if "path" in model else ""),
        "",
    ]
    rows: list[tuple[str, str]] = []
    if validation := report["validation"]:
        rows.append(
            ("validation perplexity", f"{validation['perplexity']:.4g} (loss {validation['loss']:.4f} nats)")
        )
        by_step = ", ".join(f"{t}: {loss:.4f}" for t, loss in enumerate(validation["loss_by_step"], start=1))
        rows.append(("  loss after each step", by_step))
        for kind, entry in validation["by_kind"].items():
            if entry["tokens"]:
                rows.append(
                    (
                        f"  {kind} rows",
                        f"{entry['perplexity']:.4g} over {entry['tokens']:,} tokens "
                        f"({entry['rows']} of {entry['rows_available']} rows)",
                    )
                )
    if act := report["act"]:
        rows.append(
            (
                "ACT mean steps",
                f"{act['mean_steps']:.3f} of {act['max_steps']} (variance {act['var_steps']:.3f})",
            )
        )
        histogram = ", ".join(f"{step}: {share:.1%}" for step, share in act["step_histogram"].items())
        rows.append(("  halting step shares", histogram))
        quartiles = ", ".join(f"{q['mean_steps']:.2f}" for q in act["steps_by_loss_quartile"])
        rows.append(("  steps by loss quartile", f"{quartiles} (easiest to hardest)"))
        if act["loss_step_correlation"] is not None:
            rows.append(("  loss-step correlation", f"{act['loss_step_correlation']:+.3f}"))
    if memory := report["memory"]:
        for kind, entry in memory["by_kind"].items():
            if entry["active"]:
                rows.append(
                    (
                        f"memory ({kind} rows)",
                        f"write rate {entry['write_rate']:.3f}, read gate {entry['read_gate']:.3f}, "
                        f"slots used {entry['slots_used']:.1f} of {memory['capacity']}",
                    )
                )
    if (context := report.get("long_context")) and context["tokens"]:
        rows.append(
            (
                "long-context loss",
                f"{context['loss_carried_memory']:.4f} with carried memory, {context['loss_rows_alone']:.4f} "
                f"rows alone ({context['documents']} documents of {context['rows']} rows)",
            )
        )
        if context["later_rows_tokens"]:
            rows.append(
                (
                    "  their later rows",
                    f"{context['later_rows_loss_carried_memory']:.4f} carried, "
                    f"{context['later_rows_loss_rows_alone']:.4f} alone",
                )
            )
    if math_section := report["math"]:
        label = "math EM (SYNTHETIC)" if math_section["synthetic"] else "math EM"
        rows.append((label, _share(math_section["exact_match"])))
        for name, entry in math_section["sources"].items():
            rows.append(
                (
                    f"  {name}",
                    f"{_share(entry['exact_match'])} ({entry['correct']}/{entry['examples']}, "
                    f"± {entry['stderr']:.3f}; {entry['no_answer']} without an answer)",
                )
            )
    if mbpp := report["mbpp"]:
        rows.append(
            (
                "MBPP pass@1",
                f"{_share(mbpp['pass_at_1'])} ({mbpp['passed']}/{mbpp['examples']}, ± {mbpp['stderr']:.3f})",
            )
        )
        rows.append(("  outcomes", ", ".join(f"{k} {v}" for k, v in mbpp["outcomes"].items())))
        rows.append(("  sandbox", mbpp["isolation"]))
    if qa := report["qa"]:
        rows.append(("QA EM / F1", f"{_share(qa['exact_match'])} / {_share(qa['f1'])}"))
        for name, entry in qa["sources"].items():
            truncated = (
                f", {entry['truncated_prompts']} prompts cut to fit" if entry["truncated_prompts"] else ""
            )
            rows.append(
                (
                    f"  {name}",
                    f"{_share(entry['exact_match'])} / {_share(entry['f1'])} ({entry['examples']} examples{truncated})",
                )
            )
    if lm_eval := report.get("lm_eval"):
        for task, entry in lm_eval["tasks"].items():
            figures = ", ".join(f"{name} {value:.3f}" for name, value in entry["lm_eval"].items())
            rows.append(
                (f"lm-eval {task}", f"{figures} (ours: exact_match {_share(entry['ours']['exact_match'])})")
            )
            rows.append(
                ("  same completions as ours", f"{entry['same_completions']:.1%} of {entry['examples']}")
            )
    generation = report["generation"]
    verdict = "COLLAPSED: " + "; ".join(generation["reasons"]) if generation["collapsed"] else "no collapse"
    rows.append(("generation check", verdict))
    rows.append(
        (
            "  distinct-1 / distinct-2",
            f"{generation['distinct_1']:.3f} / {generation['distinct_2']:.3f} over {generation['num_tokens']} "
            f"words of {generation['num_texts']} greedy completions",
        )
    )
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    if report["skipped"]:
        lines += ["", "not measured:"]
        lines += [f"  {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
