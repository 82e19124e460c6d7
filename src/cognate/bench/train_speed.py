"""`cognate bench train`: training throughput of the Cognate fast path against a plain transformer, in one run.

In one process: the machine's bf16 and fp32 matmul peaks, the precision `bf16: auto` chooses from them
(cognate.train.precision), then a fixed number of timed optimizer updates (after untimed warm-up ones) of
    baseline         benchmarks/plain_gpt.py: nanoGPT-style, the `cognate-25m` dimensions, full-logits
                     F.cross_entropy, PyTorch AdamW, no Cognate code; in the precision its users run it in
                     (nanoGPT: fp32 on a CPU, bf16 on a GPU)
    baseline_chosen  the same in the precision Cognate chose (run only when that differs)
    t1               the Cognate model with one refinement step and memory off (the baseline's work, give or take
                     SwiGLU's third matrix), trained as `cognate train` trains it, in the chosen precision
    default          `cognate-25m` as configured (t_train refinement steps, the first ones under no_grad)
each on the same batches. MFU divides achieved FLOP/s (counting the recursion steps that really run) by the
matmul peak of the precision that arm used, so the figures are comparable across machines.

The recursion's price: `default_breakdown` gives, per part of the default model's update (the blocks of the steps
with gradients, with the embeddings and the optimizer; the no_grad steps; the halting head; the memory; the LM
head), its FLOPs per token and its measured seconds per token. Parts are timed by switching them off one at a
time (memory, then the no_grad steps, then halting) and taking the difference; the LM head is timed alone (its
fused forward + backward on the same number of rows); the steps with gradients are the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from cognate.model.config import CognateConfig, get_preset
from cognate.model.head import fused_linear_cross_entropy
from cognate.model.model import CognateModel
from cognate.train.config import TrainConfig
from cognate.train.optimizer import build_optimizer
from cognate.train.precision import Precision, add_bf16_argument, autocast_for, resolve_precision
from cognate.train.throughput import flops_breakdown, flops_per_token, supervised_steps, synchronize

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


def cognate_update(model: CognateModel, device: torch.device, bf16: bool):
    """One optimizer update as `cognate train` makes it: autocast as chosen, fused head, clipping, MuGrokfast."""
    config = TrainConfig()
    optimizer = build_optimizer(model, config)
    autocast = autocast_for(device, bf16)

    def update(input_ids, targets):
        with autocast():
            loss = model(input_ids, targets=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def users_precision_is_bf16(device: torch.device) -> bool:
    """How nanoGPT's users run it: bf16 autocast on a GPU, fp32 on a CPU."""
    return device.type == "cuda"


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    precision = resolve_precision(args.bf16, device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        input_ids = torch.randint(32_000, (args.batch_size, args.seq_len), generator=generator)
        batches.append((input_ids.to(device), torch.roll(input_ids, -1, dims=1).to(device)))
    tokens = batches[0][0].numel()

    def timed(name: str, update, flops: float, bf16: bool) -> dict:
        measured = time_updates(update, batches, args.warmup, args.steps, device)
        peak = precision.bf16_peak_flops if bf16 else precision.fp32_peak_flops
        figures = {
            "tokens_per_s": measured["tokens_per_s"],
            "mfu": measured["tokens_per_s"] * flops / peak,
            "flops_per_token": flops,
            "precision": "bf16" if bf16 else "fp32",
            "peak_memory_bytes": measured["peak_memory_bytes"],
        }
        if not args.json:
            print(
                f"{name:>16}: {figures['tokens_per_s']:8.0f} tokens/s, MFU {figures['mfu']:.1%} "
                f"({figures['precision']})",
                file=sys.stderr,
            )
        return figures

    plain = load_baseline(args.baseline)
    users_bf16 = users_precision_is_bf16(device)
    arms = {}
    for name, bf16 in (("baseline", users_bf16), ("baseline_chosen", precision.bf16)):
        if name == "baseline_chosen" and bf16 == users_bf16:
            arms[name] = arms["baseline"]
            continue
        torch.manual_seed(0)
        model = plain.PlainGPT(plain.PlainConfig(max_seq_len=args.seq_len)).to(device)
        optimizer = plain.make_optimizer(model)

        def baseline_update(input_ids, targets, model=model, optimizer=optimizer, bf16=bf16):
            plain.train_step(model, optimizer, input_ids, targets, device.type, bf16)

        arms[name] = timed(name, baseline_update, model.flops_per_token(args.seq_len), bf16)
        del model, optimizer, baseline_update

    preset = get_preset("cognate-25m").replace(
        max_seq_len=max(get_preset("cognate-25m").max_seq_len, args.seq_len)
    )
    arms["t1"] = _cognate_arm(timed, "t1", _one_step(preset), args, device, precision)
    arms["default"] = _cognate_arm(timed, "default", preset, args, device, precision)
    breakdown = _default_breakdown(timed, preset, arms["default"], args, device, precision, tokens)

    report = {
        "bf16_peak_flops": precision.bf16_peak_flops,
        "fp32_peak_flops": precision.fp32_peak_flops,
        "precision": precision.to_dict(),
    }
    for name, figures in arms.items():
        report[f"{name}_tokens_per_s"] = figures["tokens_per_s"]
        report[f"mfu_{name}"] = figures["mfu"]
        report[f"{name}_flops_per_token"] = figures["flops_per_token"]
        report[f"{name}_precision"] = figures["precision"]
        report[f"{name}_peak_memory_bytes"] = figures["peak_memory_bytes"]
    report["speedup_t1"] = report["t1_tokens_per_s"] / report["baseline_tokens_per_s"]
    report["speedup_default"] = report["default_tokens_per_s"] / report["baseline_tokens_per_s"]
    report["speedup_t1_same_precision"] = report["t1_tokens_per_s"] / report["baseline_chosen_tokens_per_s"]
    report["default_breakdown"] = breakdown
    report["settings"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "optimizer": TrainConfig().optimizer,
        "torch": torch.__version__,
        "bf16_setting": args.bf16,
    }
    return report


def _one_step(config: CognateConfig) -> CognateConfig:
    return config.replace(t_train=1, t_infer=1, grad_steps=1, mem_enabled=False)


def _cognate_arm(timed, name, config, args, device, precision: Precision) -> dict:
    torch.manual_seed(0)
    model = CognateModel(config).to(device)
    return timed(
        name,
        cognate_update(model, device, precision.bf16),
        flops_per_token(model, args.seq_len),
        precision.bf16,
    )


def _default_breakdown(timed, config, default: dict, args, device, precision: Precision, tokens: int) -> dict:
    """FLOPs and seconds per token of each part of the default model's update (see the module docstring)."""
    flops = flops_breakdown(CognateModel(config), args.seq_len)
    seconds = {part: 0.0 for part in flops}
    previous = 1.0 / default["tokens_per_s"]
    # Switch parts off one at a time; a part that does not run at this length (zero FLOPs) costs nothing.
    for part, changes in (
        ("memory", {"mem_enabled": False}),
        ("no_grad_step_blocks", {"t_train": len(supervised_steps(config))}),
        ("halting", {"act_enabled": False}),
    ):
        config = config.replace(**changes)
        if flops[part] == 0:
            continue
        figures = _cognate_arm(timed, f"default -{part}", config, args, device, precision)
        current = 1.0 / figures["tokens_per_s"]
        seconds[part] = previous - current
        previous = current
    grad_head_passes = len(supervised_steps(config))
    seconds["lm_head"] = grad_head_passes * _time_head(config, tokens, args, device, precision) / tokens
    seconds["grad_step_blocks"] = previous - seconds["lm_head"]
    return {part: {"flops_per_token": flops[part], "seconds_per_token": seconds[part]} for part in flops}


def _time_head(config: CognateConfig, tokens: int, args, device, precision: Precision) -> float:
    """Seconds of one fused LM head forward + backward over `tokens` rows (best of `args.steps`)."""
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(tokens, config.d_model, device=device, generator=generator, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.d_model, device=device, generator=generator) * 0.02
    weight.requires_grad_(True)
    targets = torch.randint(config.vocab_size, (tokens,), device=device, generator=generator)
    autocast = autocast_for(device, precision.bf16)

    def run():
        with autocast():
            fused_linear_cross_entropy(hidden, weight, targets).loss_sum.backward()
        synchronize(device)

    for _ in range(args.warmup):
        run()
    best = float("inf")
    for _ in range(max(args.steps, 1)):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


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
    add_bf16_argument(parser)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(measure(args)))
    return 0
