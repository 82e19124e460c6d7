"""`cognate bench scaling`: training-step time per token against sequence length.

Times forward + backward of a preset (by default `memory`: sliding-window attention and the long-term memory on)
at several sequence lengths, each step processing the same number of tokens (batch = tokens / length), so
seconds per token is comparable across lengths. Attention is blocked sliding-window (O(S·W)) and the memory's
per-token work is bounded by its slots, so the figure should stay flat as the length grows: the JSON line reports
the ratio of the longest length's seconds per token to the shortest's.

A document longer than a row is trained on as consecutive segments with the memory carried from one to the next
(cognate.train.carry), so the benchmark also times the longest length read that way, in segments of the
shortest length (`carried_segments` in the JSON line): its seconds per token against one forward at the shortest
length is what a long document costs per token over a short one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.train.precision import add_bf16_argument, autocast_for, resolve_precision
from cognate.train.throughput import synchronize


def time_training_step(
    model: CognateModel,
    batch: int,
    length: int,
    repeats: int,
    warmup: int,
    autocast,
    segment: int | None = None,
) -> float:
    """Median seconds of one forward + backward over a [batch, length] batch of random tokens; with `segment`,
    read as consecutive segments of that many tokens, each with its own forward + backward and the memory state
    of the previous one (detached), as training reads a document longer than a row."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(model.cfg.vocab_size, (batch, length), generator=generator).to(device)
    targets = torch.roll(input_ids, -1, dims=1)
    segment = segment or length
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        memory_state = None
        for first in range(0, length, segment):
            part = slice(first, first + segment)
            with autocast():
                out = model(input_ids[:, part], targets[:, part], memory_state=memory_state)
            out.loss.backward()
            memory_state = out.memory_state.detach() if out.memory_state is not None else None
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="memory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens-per-step", type=int, default=8192, help="batch = tokens-per-step / length")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed steps per length (the median is reported)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_bf16_argument(parser)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def run(args: argparse.Namespace) -> int:
    lengths = sorted(args.lengths)
    too_short = [n for n in lengths if n > args.tokens_per_step]
    if too_short:
        raise SystemExit(f"--tokens-per-step={args.tokens_per_step} is shorter than the lengths {too_short}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, *lengths))
    model = CognateModel(cfg).to(args.device).train()
    precision = resolve_precision(args.bf16, torch.device(args.device))
    autocast = autocast_for(torch.device(args.device), precision.bf16)
    seconds_per_token = {}
    for length in lengths:
        batch = args.tokens_per_step // length
        seconds = time_training_step(model, batch, length, args.repeats, args.warmup, autocast)
        seconds_per_token[str(length)] = seconds / (batch * length)
        if not args.json:
            print(
                f"length {length:>6} x batch {batch:>3}: {seconds_per_token[str(length)] * 1e6:.2f} us/token"
            )
    ratio = seconds_per_token[str(lengths[-1])] / seconds_per_token[str(lengths[0])]
    longest, shortest = lengths[-1], lengths[0]
    batch = args.tokens_per_step // longest
    carried = time_training_step(model, batch, longest, args.repeats, args.warmup, autocast, segment=shortest)
    carried_per_token = carried / (batch * longest)
    if not args.json:
        print(
            f"length {longest:>6} x batch {batch:>3} in segments of {shortest}, memory carried: "
            f"{carried_per_token * 1e6:.2f} us/token"
        )
    result = {
        "seconds_per_token": seconds_per_token,
        f"ratio_{lengths[-1]}_to_{lengths[0]}": round(ratio, 3),
        "carried_segments": {
            "length": longest,
            "segment": shortest,
            "seconds_per_token": carried_per_token,
            f"ratio_to_{shortest}": round(carried_per_token / seconds_per_token[str(shortest)], 3),
        },
        "preset": args.preset,
        "memory": cfg.mem_enabled,
        "attn_window": cfg.attn_window,
        "tokens_per_step": args.tokens_per_step,
        "repeats": args.repeats,
        "device": args.device,
        "bf16": precision.bf16,
        "bf16_setting": args.bf16,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0
