"""`cognate bench ablation`: does each mechanism buy more than it costs? Five arms under one budget, and a sixth
on request.

    plain          1 refinement step, no ACT, no memory: a plain transformer of the same size
    recursion      the preset's refinement steps, no ACT, no memory
    act            refinement + ACT halting
    memory         refinement + the slot memory (mem_kind "slots")
    full           the preset as configured (refinement, ACT, memory)
    memory_neural  refinement + the Titans neural memory (mem_kind "neural"; not in the default set)

Every arm is trained by `cognate train` itself (a subprocess per arm: same data, same initialisation seed, same
optimizer and token schedule, same thread count), under one budget:

    time      every arm the same wall-clock seconds (training, its periodic validation included)
    tokens    every arm the same training tokens
    converge  every arm trains over the curriculum for up to --epochs passes, stopped early once validation stops
              improving: the data-limited regime of a ~3M-token curriculum

Arms run one after another (default) or side by side (`--side-by-side`); the JSON says which. Then each arm's
best-validation model is scored here on the same fixed validation rows: the loss overall and per source family
(math and code documents of the short rows, recognised by their layout's first line; long-context QA = the long
rows), the answer-only loss of the math documents (the tokens after `Solution:`), ACT's mean steps and variance
at inference, and the inference (scoring) tokens/s. One JSON line, and a PNG of the validation curves against
seconds and against tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cognate.data.dataset import PackedDataset, read_manifest
from cognate.data.tokenizer import load_tokenizer
from cognate.eval.tasks import solution_targets
from cognate.model.config import CognateConfig, ConfigError
from cognate.model.head import IGNORE_INDEX
from cognate.model.model import CognateModel
from cognate.train import checkpoint
from cognate.train.carry import continues_document
from cognate.train.config import parse_overrides
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed
from cognate.train.halting import calibrate_halting
from cognate.train.precision import add_bf16_argument, autocast_for, resolve_precision
from cognate.train.throughput import flops_per_token

ARMS = ("plain", "recursion", "act", "memory", "full", "memory_neural")
DEFAULT_ARMS = ARMS[:5]
BUDGETS = ("time", "tokens", "converge")
FAMILIES = ("math", "code", "qa")
CALIBRATION_BATCHES = 16  # validation batches the halting threshold is calibrated on
# The first line of each short-row layout (cognate.data.formatting): math, code, code repair.
FAMILY_PREFIXES = {"math": ("Problem:",), "code": ("Task:", "Buggy code:")}


def arm_overrides(arm: str, preset: CognateConfig) -> dict:
    """Model settings of an arm: the preset with mechanisms switched off."""
    plain = dict(t_train=1, t_infer=1, grad_steps=1, act_enabled=False, mem_enabled=False)
    return {
        "plain": plain,
        "recursion": dict(act_enabled=False, mem_enabled=False),
        "act": dict(mem_enabled=False),
        "memory": dict(act_enabled=False, mem_enabled=True, mem_kind="slots"),
        "full": {},
        "memory_neural": dict(act_enabled=False, mem_enabled=True, mem_kind="neural"),
    }[arm]


def budget_overrides(args: argparse.Namespace, train_tokens: int) -> dict:
    """Training settings of the budget, the same for every arm."""
    common = dict(
        seed=args.seed,
        batch_size=args.batch_size,
        grad_accum=1,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        log_interval=args.eval_interval,
        checkpoint_interval=10**9,  # the trainer still saves at the end and keeps the best model
        sample_prompts=[],
        bf16=args.bf16,
    )
    if args.budget == "time":
        # One pass over the curriculum sets the schedule's length; the clock stops the arm.
        budget = dict(max_tokens=train_tokens, max_minutes=args.seconds / 60, patience=10**6)
    elif args.budget == "tokens":
        budget = dict(max_tokens=args.tokens, patience=10**6)
    else:
        budget = dict(max_tokens=args.epochs * train_tokens, patience=args.patience)
    return common | budget | dict(warmup_tokens=min(args.warmup_tokens, budget["max_tokens"] // 2))


def train_command(args, arm: str, data_dir: Path, run_dir: Path, preset: CognateConfig, train_tokens: int):
    settings = args.model_overrides | arm_overrides(arm, preset) | budget_overrides(args, train_tokens)
    command = [sys.executable, "-m", "cognate.cli", "train", "--preset", args.preset, "--data", str(data_dir)]
    command += [
        "--out",
        str(run_dir),
        "--overwrite",
        "--device",
        "cpu" if args.device == "cpu" else args.device,
    ]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def train_arms(args, data_dir: Path, out: Path, preset: CognateConfig, train_tokens: int) -> dict[str, float]:
    """Run every arm's training; returns each arm's wall-clock seconds (process start to end).

    First every arm trains two updates untimed: the compiled kernels land in the on-disk cache, so no arm's
    budget pays for compilation (the first arm would pay for all otherwise).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for arm in args.arms:
        command = train_command(args, arm, data_dir, out / "warmup" / arm, preset, train_tokens)
        command += ["--set", "max_steps=2", "--set", "eval_interval=2", "--set", "max_minutes=null"]
        subprocess.run(command, env=env, check=True, capture_output=True)
    seconds, running = {}, {}
    for arm in args.arms:
        log = (out / f"{arm}.log").open("w")
        started = time.perf_counter()
        process = subprocess.Popen(
            train_command(args, arm, data_dir, out / arm, preset, train_tokens),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        running[arm] = (process, started, log)
        if not args.side_by_side:
            _finish(arm, running.pop(arm), seconds, out)
    for arm, entry in list(running.items()):
        _finish(arm, entry, seconds, out)
    return seconds


def _finish(arm: str, entry, seconds: dict, out: Path) -> None:
    process, started, log = entry
    code = process.wait()
    seconds[arm] = time.perf_counter() - started
    log.close()
    if code != 0:
        tail = (out / f"{arm}.log").read_text().splitlines()[-5:]
        raise SystemExit(f"error: arm {arm!r} failed (exit {code}); see {out / f'{arm}.log'}: {tail}")
    _log(f"{arm}: trained in {seconds[arm]:.0f} s")


# --------------------------------------------------------------------------------------------- validation rows


@dataclass
class ValidationRows:
    """Fixed validation rows with, per target position, which family and whether it is a math answer token."""

    kind: str  # short | long
    input_ids: torch.Tensor  # [N, S]
    targets: torch.Tensor  # [N, S]
    family: np.ndarray  # [N, S] of str: math, code, qa or "" (another layout)
    answer: np.ndarray  # [N, S] bool
    documents: np.ndarray  # [N, 2]: each row's (document, index in it); document < 0 for whole documents only


def validation_rows(data_dir: Path, n_short: int, n_long: int) -> list[ValidationRows]:
    tokenizer = load_tokenizer(data_dir)
    eos = read_manifest(data_dir)["tokenizer"]["special_token_ids"]["eos"]
    out = []
    for kind, count in (("short", n_short), ("long", n_long)):
        data = PackedDataset(data_dir, "validation", kind)
        count = min(count, len(data))
        if count == 0:
            continue
        input_ids, targets = (torch.stack(t) for t in zip(*(data[i] for i in range(count)), strict=True))
        family = np.full(input_ids.shape, "", dtype=object)
        answer = np.zeros(input_ids.shape, dtype=bool)
        if kind == "long":
            family[:] = "qa"
        else:
            for row in range(count):
                _label_row(input_ids[row].tolist(), eos, tokenizer, family[row], answer[row])
        out.append(ValidationRows(kind, input_ids, targets, family, answer, data.documents[:count]))
    return out


def _label_row(ids: list[int], eos: int, tokenizer, family: np.ndarray, answer: np.ndarray) -> None:
    """Label each document of a packed row (documents end at `eos`) by its layout, and its answer tokens."""
    start = 0
    for end in [i for i, t in enumerate(ids) if t == eos] + [len(ids)]:
        if end > start:
            text = tokenizer.decode(ids[start:end])
            # A fill-in-the-middle document starts with <fim_prefix>, then its layout's first line.
            visible = tokenizer.decode(ids[start:end], skip_special_tokens=True).lstrip()
            name = next((f for f, prefixes in FAMILY_PREFIXES.items() if visible.startswith(prefixes)), "")
            family[start:end] = name
            if name == "math":
                encoded, solution = solution_targets(text, tokenizer)
                if encoded == ids[start:end]:  # else a document cut by packing or FIM: no answer to score
                    answer[start:end] = solution
        start = end + 1


@torch.no_grad()
def score(model: CognateModel, rows: list[ValidationRows], batch_size: int, autocast) -> dict:
    """Loss overall, per family and on math answers; ACT statistics; scoring throughput.

    Long rows are read one at a time, in order; a row that continues the previous row's document gets the memory
    that row left (a document longer than a row is read as consecutive segments, as in training)."""
    model.eval()
    sums = {name: [0.0, 0] for name in ("all", *FAMILIES, "math_answer")}
    steps, seconds, tokens = [], 0.0, 0
    for part in rows:
        size = batch_size if part.kind == "short" else 1
        carried, previous = None, None
        for start in range(0, len(part.input_ids), size):
            batch = slice(start, start + size)
            input_ids, targets = part.input_ids[batch], part.targets[batch]
            documents = part.documents[batch]
            continues = (
                size == 1 and previous is not None and bool(continues_document(previous, documents).all())
            )
            begin = time.perf_counter()
            with autocast():
                out = model(input_ids, memory_state=carried if continues else None)
            seconds += time.perf_counter() - begin
            carried, previous = out.memory_state, documents
            tokens += input_ids.numel()
            losses = F.cross_entropy(
                out.logits.float().flatten(0, 1),
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view_as(targets)
            valid = (targets != IGNORE_INDEX).numpy()
            masks = {"all": valid, "math_answer": valid & part.answer[batch]}
            masks |= {f: valid & (part.family[batch] == f) for f in FAMILIES}
            for name, mask in masks.items():
                sums[name][0] += float(losses[torch.from_numpy(mask)].sum())
                sums[name][1] += int(mask.sum())
            steps.append(out.act["steps"][torch.from_numpy(valid)].float())
    model.train()
    steps = torch.cat(steps)
    figures = {
        f"val_loss_{n}" if n != "all" else "val_loss": s / c if c else None for n, (s, c) in sums.items()
    }
    figures |= {f"val_tokens_{n}": c for n, (_, c) in sums.items() if n != "all"}
    return figures | {
        "act_mean_steps": float(steps.mean()),
        "act_var_steps": float(steps.var(unbiased=False)),
        "inference_tokens_per_s": tokens / seconds,
    }


# ---------------------------------------------------------------------------------------------------- the study


def arm_report(
    run_dir: Path, rows, args, autocast, short_ratio: float, seq_lens: dict, wall_s: float, data_dir: Path
) -> dict:
    run_config = json.loads((run_dir / "run_config.json").read_text())
    config = CognateConfig.from_dict(run_config["model"])
    model = CognateModel(config)
    best = run_dir / "best_model.pt"
    state = checkpoint.load(best if best.exists() else run_dir / "checkpoint.pt")["model"]
    model.load_state_dict(state)
    # Halting at the threshold the user would get: calibrated on the trainer's validation batches, as pretrain does.
    calibration = None
    if config.act_enabled:
        dist = Distributed(rank=0, world_size=1, device=next(model.parameters()).device)
        validation = TrainingData(data_dir, batch_size=args.batch_size, seed=0, dist=dist)
        calibration = calibrate_halting(
            model, validation, CALIBRATION_BATCHES, autocast, dist, args.halting_loss_budget
        ).to_dict()
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [
        {"step": m["step"], "tokens": m["tokens"], "seconds": m.get("elapsed_s"), "val_loss": m["val_loss"]}
        for m in metrics
        if "val_loss" in m
    ]
    flops = short_ratio * flops_per_token(model, seq_lens["short"]) + (1 - short_ratio) * flops_per_token(
        model, seq_lens["long"]
    )
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "updates": summary["steps"],
        "tokens": summary["tokens"],
        "flops_per_token": flops,
        "seconds": summary["wall_time_s"],
        "process_seconds": wall_s,
        "stop_reason": summary["stop_reason"],
        "best_val_loss_during_training": summary["best_val_loss"],
        **score(model, rows, args.score_batch_size, autocast),
        "curve": curve,
        "halting_calibration": calibration,
        "model": {
            k: getattr(model.cfg, k)
            for k in (
                "t_train",
                "t_infer",
                "grad_steps",
                "act_enabled",
                "act_threshold",
                "mem_enabled",
                "mem_kind",
            )
        },
    }


def plot(arms: dict, path: Path, budget: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for name, arm in arms.items():
        curve = arm["curve"]
        by_time.plot([c["seconds"] for c in curve], [c["val_loss"] for c in curve], label=name)
        by_tokens.plot([c["tokens"] for c in curve], [c["val_loss"] for c in curve], label=name)
    by_time.set_xlabel("training seconds")
    by_tokens.set_xlabel("training tokens")
    for axis in (by_time, by_tokens):
        axis.set_ylabel("validation loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"cognate bench ablation (budget: {budget})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    from cognate.model.config import get_preset
    from cognate.train.data import ensure_data

    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        print(
            f"error: --arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    data_dir = ensure_data(args.data, Distributed(rank=0, world_size=1, device=device))
    manifest = read_manifest(data_dir)
    try:
        args.model_overrides = parse_overrides(args.overrides)
        unknown = sorted(set(args.model_overrides) - {f.name for f in dataclasses.fields(CognateConfig)})
        if unknown:
            raise ConfigError(f"--set {', '.join(unknown)}: not a model setting")
        preset = get_preset(args.preset).replace(**args.model_overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train_tokens = sum(manifest["rows"]["train"][k]["tokens"] for k in ("short", "long"))
    precision = resolve_precision(args.bf16, device)
    _log(
        f"{precision.describe()}; training {len(args.arms)} arms ({'side by side' if args.side_by_side else 'one after another'})"
    )

    wall = train_arms(args, data_dir, out, preset, train_tokens)
    rows = validation_rows(data_dir, args.val_short_rows, args.val_long_rows)
    autocast = autocast_for(device, precision.bf16)
    arms = {
        arm: arm_report(
            out / arm,
            rows,
            args,
            autocast,
            manifest["short_ratio"],
            manifest["sequence_lengths"],
            wall[arm],
            data_dir,
        )
        for arm in args.arms
    }
    plot(arms, out / "ablation.png", args.budget)
    result = {
        "budget": args.budget,
        "arms": arms,
        "settings": {
            "preset": args.preset,
            "model_overrides": args.model_overrides,
            "halting_loss_budget": args.halting_loss_budget,
            "data": str(data_dir),
            "synthetic_data": bool(manifest.get("synthetic")),
            "arms_ran": "side by side" if args.side_by_side else "one after another",
            "threads_per_arm": args.threads,
            "seconds_per_arm": args.seconds if args.budget == "time" else None,
            "tokens_per_arm": args.tokens if args.budget == "tokens" else None,
            "epochs": args.epochs if args.budget == "converge" else None,
            "patience": args.patience if args.budget == "converge" else None,
            "batch_size": args.batch_size,
            "warmup_tokens": args.warmup_tokens,
            "eval_interval": args.eval_interval,
            "val_short_rows": args.val_short_rows,
            "val_long_rows": args.val_long_rows,
            "seed": args.seed,
            "precision": precision.to_dict(),
            "plot": str(out / "ablation.png"),
            "torch": torch.__version__,
        },
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    if not args.json:
        for arm, figures in arms.items():
            _log(
                f"{arm:>9}: val loss {figures['val_loss']:.4f} | updates {figures['updates']} | "
                f"tokens {figures['tokens']} | {figures['flops_per_token'] / 1e6:.1f} MFLOP/token | "
                f"ACT {figures['act_mean_steps']:.2f} steps (var {figures['act_var_steps']:.3f})"
            )
    print(json.dumps(result))
    return 0


def _log(message: str) -> None:
    print(f"[ablation] {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument("--data", type=Path, help="a prepared data folder (default: the built-in curriculum)")
    parser.add_argument(
        "--out", type=Path, default=Path("ablation"), help="folder for the runs, JSON and PNG"
    )
    parser.add_argument("--preset", default="tiny", help="model preset the arms derive from (default tiny)")
    parser.add_argument("--budget", choices=BUDGETS, default="time")
    parser.add_argument("--seconds", type=float, default=300, help="time budget per arm (default 300)")
    parser.add_argument("--tokens", type=int, default=500_000, help="token budget per arm (default 500k)")
    parser.add_argument("--epochs", type=int, default=10, help="converge budget: at most this many passes")
    parser.add_argument("--patience", type=int, default=3, help="converge budget: validations without gain")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a model setting of the preset for every arm (repeatable), e.g. --set t_train=2",
    )
    parser.add_argument(
        "--halting-loss-budget",
        type=float,
        default=0.03,
        help="halting arms are scored at the cheapest threshold costing at most this many nats and half of what "
        "the later refinement steps buy (default 0.03)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_ARMS),
        help=f"any of {', '.join(ARMS)} (default: all but memory_neural)",
    )
    parser.add_argument("--side-by-side", action="store_true", help="train the arms at the same time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per arm (default 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per update (default 4)")
    parser.add_argument("--warmup-tokens", type=int, default=50_000)
    parser.add_argument("--eval-interval", type=int, default=25, help="updates between validations")
    parser.add_argument("--eval-batches", type=int, default=4, help="batches per validation while training")
    parser.add_argument(
        "--val-short-rows", type=int, default=64, help="short validation rows scored at the end"
    )
    parser.add_argument("--val-long-rows", type=int, default=8, help="long validation rows scored at the end")
    parser.add_argument("--score-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    add_bf16_argument(parser)
