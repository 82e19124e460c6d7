"""`cognate bench memory-recall`: long-range key-value recall that only the long-term memory can solve.

A sequence stores `n_pairs` key-value pairs, one per memory chunk at a random offset among random filler tokens,
then a gap of filler, then queries every key once (in random order), each followed by its value:

    [k1 v1 f f f f f f] [f f k2 v2 f f f f] ... | f f f ... f (gap) | k3 v3 k1 v1 k2 v2 ...
         store: one pair per chunk                 > attention reach       queries

The model is scored on the value after each queried key. Values are drawn independently and uniformly, so nothing
in the query section predicts them (chance = 1 / n_values). The gap is longer than everything attention can reach
across all layers and refinement steps (t x n_layers x (attn_window - 1) tokens), so a model reads the value of a
key only through the memory. Both arms train the same model, data and steps; the control has `mem_enabled=False`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from cognate.model.config import CognateConfig, ConfigError
from cognate.model.model import CognateModel

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RecallSettings:
    n_pairs: int = 6
    n_keys: int = 32
    n_values: int = 16
    n_filler: int = 16
    chunk_size: int = 8
    attn_window: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    refinement_steps: int = 2
    mem_capacity: int = 32
    mem_topk: int = 4
    mem_dim: int = 32
    mem_kind: str = "slots"
    w_read: float = 0.05
    w_write: float = 0.05
    batch_size: int = 8
    train_steps: int = 1500
    lr: float = 3e-3
    eval_sequences: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)} must be positive"
            for name, value in asdict(self).items()
            if name not in ("seed", "w_read", "w_write", "mem_kind") and value <= 0
        ]
        if self.n_pairs > self.n_keys:
            problems.append(
                f"n_pairs={self.n_pairs} exceeds n_keys={self.n_keys} (keys are queried uniquely)"
            )
        if self.chunk_size < 2:
            problems.append(f"chunk_size={self.chunk_size} must hold a key and its value (at least 2)")
        if problems:
            raise ConfigError("invalid memory-recall settings: " + "; ".join(problems))

    @property
    def attention_reach(self) -> int:
        """How far back any position's state can depend on through attention alone."""
        return self.refinement_steps * self.n_layers * (self.attn_window - 1)

    @property
    def gap(self) -> int:
        """Filler between the store and the queries: past the attention reach, rounded up to whole chunks."""
        return math.ceil((self.attention_reach + 1) / self.chunk_size) * self.chunk_size

    @property
    def seq_len(self) -> int:
        return self.n_pairs * self.chunk_size + self.gap + 2 * self.n_pairs

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values


def model_config(settings: RecallSettings, memory: bool) -> CognateConfig:
    s = settings
    return CognateConfig(
        name=f"memory-recall-{'on' if memory else 'off'}",
        vocab_size=s.vocab_size,
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        ffn_hidden=4 * s.d_model,
        max_seq_len=s.seq_len,
        attn_window=s.attn_window,
        t_train=s.refinement_steps,
        t_infer=s.refinement_steps,
        grad_steps=s.refinement_steps,
        act_enabled=False,
        w_act=0.0,
        w_read=s.w_read,
        w_write=s.w_write,
        mem_enabled=memory,
        mem_capacity=s.mem_capacity,
        mem_topk=s.mem_topk,
        mem_dim=s.mem_dim,
        mem_kind=s.mem_kind,
        mem_chunk_size=s.chunk_size,
    )


def make_batch(settings: RecallSettings, batch_size: int, generator: torch.Generator):
    """input_ids, targets [B, seq_len]; targets hold the value after each queried key, -100 elsewhere."""
    s = settings
    key_ids = (
        s.n_filler + torch.rand(batch_size, s.n_keys, generator=generator).argsort(dim=1)[:, : s.n_pairs]
    )
    value_ids = (
        s.n_filler + s.n_keys + torch.randint(s.n_values, (batch_size, s.n_pairs), generator=generator)
    )
    tokens = torch.randint(s.n_filler, (batch_size, s.seq_len), generator=generator)
    rows = torch.arange(batch_size)[:, None]

    # Store: pair i sits in chunk i at a random offset, both tokens inside the chunk.
    offsets = torch.randint(s.chunk_size - 1, (batch_size, s.n_pairs), generator=generator)
    key_positions = torch.arange(s.n_pairs) * s.chunk_size + offsets
    tokens[rows, key_positions] = key_ids
    tokens[rows, key_positions + 1] = value_ids

    # Queries: every key once, in random order, each followed by its value.
    order = torch.rand(batch_size, s.n_pairs, generator=generator).argsort(dim=1)
    query_positions = s.n_pairs * s.chunk_size + s.gap + 2 * torch.arange(s.n_pairs)
    tokens[rows, query_positions] = key_ids.gather(1, order)
    tokens[rows, query_positions + 1] = value_ids.gather(1, order)

    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[rows, query_positions] = value_ids.gather(1, order)
    return tokens, targets


def train_and_evaluate(settings: RecallSettings, memory: bool) -> tuple[float, float]:
    """Train one arm from scratch; returns (accuracy on fresh sequences, training seconds)."""
    torch.manual_seed(settings.seed)
    model = CognateModel(model_config(settings, memory))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.train_steps, pct_start=0.1
    )
    data = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    model.train()
    for _ in range(settings.train_steps):
        input_ids, targets = make_batch(settings, settings.batch_size, data)
        loss = model(input_ids, targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return evaluate(model, settings), seconds


@torch.no_grad()
def evaluate(model: CognateModel, settings: RecallSettings) -> float:
    """Accuracy of the value predictions on sequences the model never trained on (a separate generator)."""
    model.eval()
    held_out = torch.Generator().manual_seed(settings.seed + 1_000_003)
    correct = total = 0
    for start in range(0, settings.eval_sequences, settings.batch_size):
        batch = min(settings.batch_size, settings.eval_sequences - start)
        input_ids, targets = make_batch(settings, batch, held_out)
        logits = model(input_ids).logits
        scored = targets != IGNORE_INDEX
        correct += (logits.argmax(-1)[scored] == targets[scored]).sum().item()
        total += scored.sum().item()
    return correct / total


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RecallSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def run(args: argparse.Namespace) -> int:
    settings = RecallSettings(**{name: getattr(args, name) for name in asdict(RecallSettings())})
    if args.threads:
        torch.set_num_threads(args.threads)
    accuracy_on, seconds_on = train_and_evaluate(settings, memory=True)
    accuracy_off, seconds_off = train_and_evaluate(settings, memory=False)
    result = {
        "accuracy_memory_on": round(accuracy_on, 4),
        "accuracy_memory_off": round(accuracy_off, 4),
        "chance": round(1 / settings.n_values, 4),
        "train_seconds_memory_on": round(seconds_on, 1),
        "train_seconds_memory_off": round(seconds_off, 1),
        "seq_len": settings.seq_len,
        "gap": settings.gap,
        "attention_reach": settings.attention_reach,
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
    }
    if not args.json:
        print(
            f"memory on {accuracy_on:.3f}, memory off {accuracy_off:.3f}, chance {1 / settings.n_values:.3f} "
            f"(seq_len {settings.seq_len}, gap {settings.gap} > attention reach {settings.attention_reach})"
        )
    print(json.dumps(result))
    return 0
