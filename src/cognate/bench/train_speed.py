"""`cognate bench train`: training throughput of the Cognate fast path against a plain transformer, in one run.

In one process: the machine's bf16 and fp32 matmul throughput, then a fixed number of timed optimizer updates
(after untimed warm-up ones) of
    baseline  benchmarks/plain_gpt.py: nanoGPT-style, the `cognate-25m` dimensions, full-logits F.cross_entropy,
              PyTorch AdamW, bf16 autocast; no Cognate code
    t1        the Cognate model with one refinement step and memory off (the baseline's work, give or take SwiGLU's
              third matrix and the halting head), trained as `cognate train` trains it
    default   `cognate-25m` as configured (t_train refinement steps, the first ones under no_grad)
each on the same batches. MFU divides achieved FLOP/s (counting the recursion steps that really run) by the bf16
matmul peak measured here, so the figures are comparable across machines and to the baseline in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train.config import TrainConfig
from cognate.train.optimizer import build_optimizer
from cognate.train.throughput import flops_per_token, measure_matmul_flops, synchronize
from cognate.train.trainer import autocast_for

DEFAULT_BASELINE = Path(__file__).resolve().parents[3] / "benchmarks" / "plain_gpt.py"


def load_baseline(path: Path):
    """The baseline module, loaded from its file: it lives outside the package on purpose."""
    if not path.is_file():
        raise SystemExit(
            f"baseline model file {path} not found (pass --baseline PATH to benchmarks/plain_gpt.py)"
        )
    spec = importlib.util.spec_from_file_location("plain_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def time_updates(update, batches, warmup: int, steps: int, device: torch.device) -> dict:
    """Seconds per update over `steps` timed updates after `warmup` untimed ones; peak memory while timed."""
    for i in range(warmup):
        update(*batches[i % len(batches)])
    synchronize(device)
    _reset_peak_memory(device)
    start = time.perf_counter()
    for i in range(steps):
        update(*batches[i % len(batches)])
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batches[0][0].numel()
    return {
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds,
        "peak_memory_bytes": _peak_memory(device),
    }


def cognate_update(model: CognateModel, device: torch.device):
    """One optimizer update as `cognate train` makes it: bf16 autocast, fused head, clipping, MuGrokfast."""
    config = TrainConfig()
    optimizer = build_optimizer(model, config)
    autocast = autocast_for(device, config.bf16)

    def update(input_ids, targets):
        with autocast():
            loss = model(input_ids, targets=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    peak_bf16 = measure_matmul_flops(torch.bfloat16, device)
    peak_fp32 = measure_matmul_flops(torch.float32, device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        input_ids = torch.randint(32_000, (args.batch_size, args.seq_len), generator=generator)
        batches.append((input_ids.to(device), torch.roll(input_ids, -1, dims=1).to(device)))

    plain = load_baseline(args.baseline)
    baseline_model = plain.PlainGPT(plain.PlainConfig(max_seq_len=args.seq_len)).to(device)
    baseline_optimizer = plain.make_optimizer(baseline_model)

    def baseline_update(input_ids, targets):
        plain.train_step(baseline_model, baseline_optimizer, input_ids, targets, device.type)

    arms = {"baseline": (baseline_update, baseline_model.flops_per_token(args.seq_len))}
    preset = get_preset("cognate-25m")
    for name, config in (
        ("t1", preset.replace(t_train=1, t_infer=1, grad_steps=1, mem_enabled=False)),
        ("default", preset),
    ):
        model = CognateModel(config.replace(max_seq_len=max(config.max_seq_len, args.seq_len))).to(device)
        arms[name] = (cognate_update(model, device), flops_per_token(model, args.seq_len))

    report = {"bf16_peak_flops": peak_bf16, "fp32_peak_flops": peak_fp32}
    for name, (update, flops) in arms.items():
        measured = time_updates(update, batches, args.warmup, args.steps, device)
        report[f"{name}_tokens_per_s"] = measured["tokens_per_s"]
        report[f"mfu_{name}"] = measured["tokens_per_s"] * flops / peak_bf16
        report[f"{name}_flops_per_token"] = flops
        report[f"{name}_peak_memory_bytes"] = measured["peak_memory_bytes"]
        if not args.json:
            print(
                f"{name:>8}: {measured['tokens_per_s']:8.0f} tokens/s, MFU {report[f'mfu_{name}']:.1%}",
                file=sys.stderr,
            )
        arms[name] = None  # free the model and its optimizer before the next arm
    report["speedup_t1"] = report["t1_tokens_per_s"] / report["baseline_tokens_per_s"]
    report["speedup_default"] = report["default_tokens_per_s"] / report["baseline_tokens_per_s"]
    report["settings"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "optimizer": TrainConfig().optimizer,
        "torch": torch.__version__,
    }
    return report


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # resets the process's peak resident set size (Linux)


def _peak_memory(device: torch.device) -> int | None:
    """Peak bytes: allocated on the GPU, or the process's peak resident set on a CPU (Linux), else None."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer updates per model")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed updates first (allocation, compilation)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="the plain model's file")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(measure(args)))
    return 0
