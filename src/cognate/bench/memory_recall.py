"""`cognate bench memory-recall`: long-range key-value recall that only the long-term memory can solve.

A sequence stores `n_pairs` key-value pairs, one per memory chunk at a random offset among random filler tokens,
then a gap of filler, then queries every key once (in random order), each followed by its value:

    [k1 v1 f f f f f f] [f f k2 v2 f f f f] ... | f f f ... f (gap) | k3 v3 k1 v1 k2 v2 ...
         store: one pair per chunk                 > attention reach       queries

The model is scored on the value after each queried key. Values are drawn independently and uniformly, so nothing
in the query section predicts them (chance = 1 / n_values). The gap is longer than everything attention can reach
across all layers and refinement steps (t x n_layers x (attn_window - 1) tokens), so a model reads the value of a
key only through the memory. Both arms train the same model, data and steps; the control has `mem_enabled=False`.

`--long`: the write policy. A document is `long_chunks` chunks of repetitive filler (a random pattern of
`filler_period` filler tokens, repeated: once seen, every later chunk is predictable and like the earlier ones),
with `n_pairs` key-value facts in chunks drawn at random from all but the last `tail_chunks`, then the queries:

    [f1 f2 f3 f4 f1 f2 f3 f4] ... [f1 f2 k1 v1 f1 f2 f3 f4] ... [f1 f2 f3 f4 ...] x tail_chunks | k1 v1 k3 v3 ...

The document is far longer than the memory holds (mem_capacity x chunk_size tokens) and is evaluated as
consecutive calls of `segment_len` tokens with the memory state carried from one call to the next, so the facts
reach the queries only through slots that survived eviction, and the last `tail_chunks` (at least the capacity, and
past the attention reach) hold no fact: keeping the newest chunks keeps none of them. The model trains on shorter
documents (`train_chunks`, one call, still several times the capacity, so eviction happens in training too). Arms,
each a CognateConfig override trained by the same function:
    gated       the model's write policy (strength = surprise x novelty x learned gate, decayed)
    fifo        the gated arm's trained model, evaluated with eviction replaced by "keep the newest"
                (LongTermMemory.eviction = "fifo")
    memory_off  mem_enabled=False
    neural      mem_kind="neural": the Titans neural memory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
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
        problems = _shared_problems(self)
        if problems:
            raise ConfigError("invalid memory-recall settings: " + "; ".join(problems))

    @property
    def attention_reach(self) -> int:
        """How far back any position's state can depend on through attention alone."""
        return _attention_reach(self)

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


def _shared_problems(settings: RecallSettings | LongRecallSettings) -> list[str]:
    """What is wrong with the settings both benchmarks share."""
    problems = [
        f"{name}={value} must be positive"
        for name, value in asdict(settings).items()
        if name not in ("seed", "w_read", "w_write", "mem_kind") and value <= 0
    ]
    if settings.n_pairs > settings.n_keys:
        problems.append(
            f"n_pairs={settings.n_pairs} exceeds n_keys={settings.n_keys} (keys are queried uniquely)"
        )
    if settings.chunk_size < 2:
        problems.append(f"chunk_size={settings.chunk_size} must hold a key and its value (at least 2)")
    return problems


def _attention_reach(settings: RecallSettings | LongRecallSettings) -> int:
    return settings.refinement_steps * settings.n_layers * (settings.attn_window - 1)


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
    model, seconds = train(settings, model_config(settings, memory), make_batch)
    return evaluate(model, settings), seconds


def train(
    settings: RecallSettings | LongRecallSettings,
    config: CognateConfig,
    batches: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> tuple[CognateModel, float]:
    """A fresh model of `config` trained on `batches(settings, batch_size, generator)`; returns it and the seconds."""
    torch.manual_seed(settings.seed)
    model = CognateModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.train_steps, pct_start=0.1
    )
    data = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    model.train()
    for _ in range(settings.train_steps):
        input_ids, targets = batches(settings, settings.batch_size, data)
        loss = model(input_ids, targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model, time.perf_counter() - start


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


@dataclass(frozen=True)
class LongRecallSettings:
    n_pairs: int = 4
    n_keys: int = 32
    n_values: int = 16
    n_filler: int = 16
    filler_period: int = 4
    chunk_size: int = 8
    attn_window: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    refinement_steps: int = 2
    mem_capacity: int = 8
    mem_topk: int = 4
    mem_dim: int = 32
    mem_decay: float = 0.99
    mem_kind: str = "slots"
    w_read: float = 0.05
    w_write: float = 0.05
    train_chunks: int = 24
    long_chunks: int = 128
    segment_len: int = 64
    batch_size: int = 8
    train_steps: int = 800
    lr: float = 3e-3
    eval_sequences: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        problems = _shared_problems(self)
        if self.mem_topk > self.mem_capacity:
            problems.append(f"mem_topk={self.mem_topk} exceeds mem_capacity={self.mem_capacity}")
        if not 0.0 < self.mem_decay <= 1.0:
            problems.append(f"mem_decay={self.mem_decay} must lie in (0, 1]")
        for name in ("train_chunks", "long_chunks"):
            if getattr(self, name) < self.tail_chunks + self.n_pairs:
                problems.append(
                    f"{name}={getattr(self, name)} leaves no room for {self.n_pairs} facts before the "
                    f"{self.tail_chunks} fact-free chunks at the end"
                )
        if problems:
            raise ConfigError("invalid memory-recall --long settings: " + "; ".join(problems))

    @property
    def attention_reach(self) -> int:
        return _attention_reach(self)

    @property
    def tail_chunks(self) -> int:
        """Fact-free chunks before the queries: all a "keep the newest" memory holds, and past the attention reach."""
        return max(self.mem_capacity, math.ceil((self.attention_reach + 1) / self.chunk_size))

    @property
    def memory_span(self) -> int:
        """Tokens the memory can hold one slot for each: mem_capacity x chunk_size."""
        return self.mem_capacity * self.chunk_size

    def document_len(self, n_chunks: int) -> int:
        return n_chunks * self.chunk_size + 2 * self.n_pairs

    @property
    def seq_len(self) -> int:
        """The longest call: a training document or an evaluation segment."""
        return max(self.document_len(self.train_chunks), self.segment_len)

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values


def make_document(
    settings: LongRecallSettings, n_chunks: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, targets [B, document_len(n_chunks)]: repetitive filler with facts, then the queries (targets hold
    the value after each queried key, -100 elsewhere); see the module docstring."""
    s = settings
    length = s.document_len(n_chunks)
    pattern = torch.randint(s.n_filler, (batch_size, s.filler_period), generator=generator)
    tokens = pattern.repeat(1, math.ceil(length / s.filler_period))[:, :length].clone()
    key_ids = (
        s.n_filler + torch.rand(batch_size, s.n_keys, generator=generator).argsort(dim=1)[:, : s.n_pairs]
    )
    value_ids = (
        s.n_filler + s.n_keys + torch.randint(s.n_values, (batch_size, s.n_pairs), generator=generator)
    )
    rows = torch.arange(batch_size)[:, None]
    fact_chunks = torch.rand(batch_size, n_chunks - s.tail_chunks, generator=generator).argsort(dim=1)
    offsets = torch.randint(s.chunk_size - 1, (batch_size, s.n_pairs), generator=generator)
    key_positions = fact_chunks[:, : s.n_pairs] * s.chunk_size + offsets
    tokens[rows, key_positions] = key_ids
    tokens[rows, key_positions + 1] = value_ids

    order = torch.rand(batch_size, s.n_pairs, generator=generator).argsort(dim=1)
    query_positions = n_chunks * s.chunk_size + 2 * torch.arange(s.n_pairs)
    tokens[rows, query_positions] = key_ids.gather(1, order)
    tokens[rows, query_positions + 1] = value_ids.gather(1, order)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[rows, query_positions] = value_ids.gather(1, order)
    return tokens, targets


def training_documents(settings: LongRecallSettings, batch_size: int, generator: torch.Generator):
    return make_document(settings, settings.train_chunks, batch_size, generator)


def long_model_config(settings: LongRecallSettings, **overrides) -> CognateConfig:
    """The gated arm's configuration, with an arm's overrides (e.g. mem_enabled=False)."""
    base = model_config(settings, memory=True).replace(
        name="memory-recall-long", mem_decay=settings.mem_decay
    )
    return base.replace(**overrides)


def long_arms() -> dict[str, dict]:
    """Each trained arm as its CognateConfig overrides."""
    return {
        "gated": {"mem_kind": "slots"},
        "memory_off": {"mem_enabled": False},
        "neural": {"mem_kind": "neural"},
    }


@torch.no_grad()
def evaluate_long(model: CognateModel, settings: LongRecallSettings) -> float:
    """Accuracy of the value predictions on held-out long documents, each run as consecutive calls of
    `segment_len` tokens with the memory state carried from one call to the next."""
    model.eval()
    held_out = torch.Generator().manual_seed(settings.seed + 1_000_003)
    correct = total = 0
    for start in range(0, settings.eval_sequences, settings.batch_size):
        batch = min(settings.batch_size, settings.eval_sequences - start)
        input_ids, targets = make_document(settings, settings.long_chunks, batch, held_out)
        state, logits = None, []
        for segment in input_ids.split(settings.segment_len, dim=1):
            out = model(segment, memory_state=state)
            state = out.memory_state
            logits.append(out.logits)
        predictions = torch.cat(logits, dim=1).argmax(-1)
        scored = targets != IGNORE_INDEX
        correct += (predictions[scored] == targets[scored]).sum().item()
        total += scored.sum().item()
    return correct / total


def run_long(settings: LongRecallSettings) -> dict:
    """Every arm of `--long`, as the JSON line's fields."""
    accuracy, seconds = {}, {}
    for arm, overrides in long_arms().items():
        model, seconds[arm] = train(settings, long_model_config(settings, **overrides), training_documents)
        accuracy[arm] = evaluate_long(model, settings)
        if arm == "gated":
            model.memory.eviction = "fifo"
            accuracy["fifo"] = evaluate_long(model, settings)
    return {
        "accuracy_gated": round(accuracy["gated"], 4),
        "accuracy_fifo": round(accuracy["fifo"], 4),
        "accuracy_memory_off": round(accuracy["memory_off"], 4),
        "accuracy_neural": round(accuracy["neural"], 4),
        "chance": round(1 / settings.n_values, 4),
        "train_seconds": {arm: round(value, 1) for arm, value in seconds.items()},
        "long_len": settings.document_len(settings.long_chunks),
        "train_len": settings.document_len(settings.train_chunks),
        "segment_len": settings.segment_len,
        "memory_span": settings.memory_span,
        "tail_chunks": settings.tail_chunks,
        "attention_reach": settings.attention_reach,
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    short, long = asdict(RecallSettings()), asdict(LongRecallSettings())
    for name in {**short, **long}:
        defaults = [
            f"{short[name]}" if name in short else "-",
            f"{long[name]} with --long" if name in long else "-",
        ]
        value = short.get(name, long.get(name))
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(value),
            default=None,
            help=f"default {' / '.join(defaults)}",
        )
    parser.add_argument(
        "--long", action="store_true", help="the write-policy benchmark: documents far longer than the memory"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def _settings(args: argparse.Namespace) -> RecallSettings | LongRecallSettings:
    """The settings of the chosen benchmark from the options given; a --long option without --long is an error."""
    chosen = LongRecallSettings if args.long else RecallSettings
    names = {f.name for f in dataclasses.fields(chosen)}
    every = names | {f.name for f in dataclasses.fields(LongRecallSettings)}
    given = {name: value for name, value in vars(args).items() if name in every and value is not None}
    foreign = sorted(set(given) - names)
    if foreign:
        raise ConfigError(f"--{foreign[0].replace('_', '-')} applies only with --long")
    return chosen(**given)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.long:
        result = run_long(settings)
        if not args.json:
            print(
                f"gated {result['accuracy_gated']:.3f}, fifo {result['accuracy_fifo']:.3f}, memory off "
                f"{result['accuracy_memory_off']:.3f}, neural {result['accuracy_neural']}, chance "
                f"{result['chance']:.3f} (documents of {result['long_len']} tokens in calls of "
                f"{result['segment_len']}; the memory holds {result['memory_span']})"
            )
        print(json.dumps(result))
        return 0
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
