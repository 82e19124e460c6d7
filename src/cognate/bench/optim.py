"""`cognate bench optim`: AdamW vs Muon+AdamW vs MuGrokfast on the `tiny` model and the curriculum's text.

The three arms start from the same initialization, see the same batches in the same order under the same
learning-rate schedule (linear warmup, cosine decay, both by tokens, as the trainer does), clip gradients at 1.0
and run in the precision `bf16: auto` chooses (cognate.train.precision). After the same token budget each is scored on the same held-out rows with the
trainer's validation loss (next-token cross-entropy, model in inference mode).

Data: a prepared folder (`--data`), else the curriculum's raw files (`--source-dir`, default `../shared/data`)
prepared into a temporary folder, else the built-in synthetic curriculum. Rows are the short side of the mix; the
bench prepares them at 256 tokens, where `tiny` runs without its long-term memory, to keep CPU runs short.

The optimizers use one preset's settings (default: the trainer's, `phase1-reduced`); plain AdamW trains every
parameter at the AdamW rate. A preset's Grokfast warmup (2,000 updates) would outlast a short bench and leave
MuGrokfast identical to Muon+AdamW, so the filter's warmup is set to the learning-rate warmup instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cognate.data.dataset import MixedBatchSampler, PackedDataset, read_manifest
from cognate.model.config import PRESETS
from cognate.model.model import CognateModel
from cognate.optim import OPTIMIZER_KINDS, group_parameters, make_optimizer, preset
from cognate.optim import PRESETS as OPTIMIZER_PRESETS
from cognate.optim.grouping import describe_groups
from cognate.train.precision import add_bf16_argument, autocast_for, resolve_precision
from cognate.train.schedule import lr_multiplier

DEFAULT_SOURCE_DIR = Path("../shared/data")
BENCH_SEQ_LEN = 256


def prepare_data(folder: Path, source_dir: Path | None) -> str:
    """Prepare the curriculum into `folder` (short rows of BENCH_SEQ_LEN tokens); returns what was used."""
    from cognate.data.prepare import PrepareConfig, prepare

    lengths = dict(short_len=BENCH_SEQ_LEN, long_len=4 * BENCH_SEQ_LEN)
    if source_dir is not None:
        prepare(PrepareConfig(out=folder, source_dir=source_dir, **lengths), log=_log)
        return f"curriculum files in {source_dir}"
    prepare(PrepareConfig(out=folder, builtin=True, **lengths), log=_log)
    return "built-in synthetic curriculum"


def train_arm(
    kind: str,
    model: CognateModel,
    settings,
    train: PackedDataset,
    batches: list[np.ndarray],
    warmup_steps: int,
    autocast,
    clip_norm: float = 1.0,
) -> list[float]:
    """Train `model` in place over `batches` with one optimizer; returns its next-token losses (L_ref)."""
    optimizer = make_optimizer(model, kind, settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    tokens_per_step = len(batches[0]) * train.seq_len
    total_tokens = tokens_per_step * len(batches)
    losses = []
    model.train()
    for step, rows in enumerate(batches):
        multiplier = lr_multiplier(step * tokens_per_step, warmup_steps * tokens_per_step, total_tokens, 0.1)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * multiplier
        input_ids, targets = train.batch(rows)
        with autocast():
            out = model(input_ids, targets=targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.losses["ref"].item())
    return losses


@torch.no_grad()
def validation_loss(model: CognateModel, data: PackedDataset, rows: int, batch_size: int, autocast) -> float:
    """Token-weighted next-token cross-entropy over the first `rows` held-out rows, in inference mode."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(rows, len(data)), batch_size):
        input_ids, targets = data.batch(range(start, min(start + batch_size, rows, len(data))))
        with autocast():
            out = model(input_ids, targets=targets)
        valid = int((targets != -100).sum())
        total += float(out.losses["ref"]) * valid
        count += valid
    model.train()
    return total / max(count, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument("--data", type=Path, help="a prepared data folder (its short rows are used)")
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help=f"curriculum files to prepare (default {DEFAULT_SOURCE_DIR} when it exists, else the built-in data)",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer updates per arm (default 150)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per update (default 8)")
    parser.add_argument("--val-rows", type=int, default=128, help="held-out rows scored (default 128)")
    parser.add_argument(
        "--preset", default="phase1-reduced", choices=sorted(OPTIMIZER_PRESETS), help="optimizer settings"
    )
    parser.add_argument(
        "--model", default="tiny", choices=sorted(PRESETS), help="model preset (default tiny)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    add_bf16_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1 or args.val_rows < 1:
        print("--steps, --batch-size and --val-rows must be positive", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        data_dir, data_note = args.data, f"prepared folder {args.data}"
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cognate-bench-optim-")))
            source = args.source_dir or (DEFAULT_SOURCE_DIR if DEFAULT_SOURCE_DIR.is_dir() else None)
            data_note = prepare_data(data_dir / "data", source)
            data_dir = data_dir / "data"
        result = compare(args, data_dir)
    result["data"] = data_note
    if not args.json:
        for kind in OPTIMIZER_KINDS:
            print(f"{kind:<11} val loss {result['val_loss'][kind]:.4f}  ({result['seconds'][kind]:.0f}s)")
    print(json.dumps(result))
    return 0


def compare(args: argparse.Namespace, data_dir: Path) -> dict:
    """Train the three arms from one initialization on one batch order; their figures as a dict."""
    train, valid = PackedDataset(data_dir, "train", "short"), PackedDataset(data_dir, "validation", "short")
    vocab = int(read_manifest(data_dir)["tokenizer"]["vocab_size"])
    config = PRESETS[args.model].replace(vocab_size=vocab)
    sampler = MixedBatchSampler({"short": len(train)}, {"short": args.batch_size}, seed=args.seed)
    batches = [rows for _, rows in itertools.islice(sampler, args.steps)]
    warmup_steps = max(1, math.ceil(0.1 * args.steps))
    base = preset(args.preset)
    settings = base.replace(grokfast=dataclasses.replace(base.grokfast, warmup_steps=warmup_steps))
    precision = resolve_precision(args.bf16, torch.device("cpu"))
    autocast = autocast_for(torch.device("cpu"), precision.bf16)
    torch.manual_seed(args.seed)
    first = CognateModel(config)
    init = first.state_dict()

    # One-time kernel set-up would otherwise count against the first arm.
    _warm_up(first, train, batches[0], autocast)
    val_loss, train_loss, seconds = {}, {}, {}
    for kind in OPTIMIZER_KINDS:
        model = CognateModel(config)
        model.load_state_dict(init)
        start = time.perf_counter()
        losses = train_arm(kind, model, settings, train, batches, warmup_steps, autocast)
        val_loss[kind] = round(validation_loss(model, valid, args.val_rows, args.batch_size, autocast), 4)
        train_loss[kind] = round(sum(losses[-10:]) / len(losses[-10:]), 4)
        seconds[kind] = round(time.perf_counter() - start, 1)
        _log(
            f"{kind}: val loss {val_loss[kind]:.4f}, last-10 train loss {train_loss[kind]:.4f}, {seconds[kind]}s"
        )
    return {
        "val_loss": val_loss,
        "train_loss_last10": train_loss,
        "tokens": args.steps * args.batch_size * train.seq_len,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": train.seq_len,
        "val_tokens": min(args.val_rows, len(valid)) * valid.seq_len,
        "model": args.model,
        "parameters": sum(p.numel() for p in first.parameters()),
        "groups": describe_groups(group_parameters(first)),
        "preset": args.preset,
        "adamw_lr": settings.adamw_lr,
        "muon_lr": settings.muon_lr,
        "grokfast": dataclasses.asdict(settings.grokfast),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "precision": precision.to_dict(),
    }


def _warm_up(model: CognateModel, data: PackedDataset, rows: np.ndarray, autocast) -> None:
    input_ids, targets = data.batch(rows)
    with autocast():
        model(input_ids, targets=targets).loss.backward()
    model.zero_grad(set_to_none=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
