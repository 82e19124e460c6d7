"""`cognate eval`'s measurements of one model: validation perplexity, ACT and memory statistics, task scores on
held-out examples, and a mode-collapse check on fixed prompts. docs/evaluation.md lists every report key.

    report = evaluate_model_dir(Path("out/tiny-model-1"), EvalConfig(data=Path("data"), source_dir=Path("raw")))

Every number is measured here or left out: a section that cannot be computed (no prepared folder, no source
folder, memory off) is None in the report, and `report["skipped"]` says why.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cognate.data.dataset import KINDS, PackedDataset, read_manifest
from cognate.data.readers import SkipLog
from cognate.data.tokenizer import encode_texts, load_tokenizer
from cognate.eval import lm_eval_tasks, metrics, tasks
from cognate.eval.sandbox import check_mbpp_solution, describe_isolation
from cognate.eval.tasks import Example, HeldOutSplit, SourceUnavailable
from cognate.export.model_dir import load_model_dir, tokenizer_sha256
from cognate.model.model import IGNORE_INDEX, CognateModel
from cognate.train.carry import CarriedMemory

REPORT_VERSION = 1
VALIDATION_SEED = 0  # which validation rows a token budget keeps: the same rows for every model
# Generation stops at a stop string, checked after pieces of STOP_CHECK_TOKENS, then of the length so far.
STOP_CHECK_TOKENS = 32
MATH_STOPS = ("\n\n", "\nProblem:")  # a worked solution is one block; the next "Problem:" is a new document
CODE_STOPS = ("\nTask:", "\nProblem:", "\nBuggy code:", "\nParagraph:")
QA_STOPS = ("\n",)  # answers are one line
# The generation check's fixed prompts, one per training layout and the seeds' "validate outputs" questions.
COLLAPSE_PROMPTS = (
    "Problem: A store has 15 apples and sells 7 of them. How many apples are left?\nSolution:\n",
    "Problem: Maria reads 12 pages a day for 5 days, then 9 pages on the sixth day. How many pages does she "
    "read in all?\nSolution:\n",
    'Task: Write a function to reverse a string.\nTests:\nassert reverse_string("abc") == "cba"\nCode:\n',
    "Buggy code:\ndef add(a, b):\n    return a - b\nFixed code:\n",
    "Paragraph: Paris\nParis is the capital and largest city of France.\n\nQuestion: What is the capital of "
    "France?\nAnswer:",
    "Paragraph: Marie Curie\nMarie Curie was a physicist and chemist. She was born in Warsaw in 1867 and moved "
    "to Paris in 1891.\n\nQuestion: In which city was Marie Curie born?\nAnswer:",
    "Remember these records. Questions about them follow at the end.\nRecord 1: the code of amber-onyx-17 is "
    "4821.\nRecord 2:",
    "The river runs through the old town, past the",
)


class EvalError(ValueError):
    """A setting or an input that makes the evaluation impossible; the message names it."""


@dataclass(frozen=True)
class EvalConfig:
    """What `cognate eval` measures, and how much of it.

    data: a prepared folder (validation perplexity, ACT and memory statistics); source_dir: the raw sources
    (held-out math, MBPP and QA examples; without it, built-in synthetic arithmetic); max_examples: per dataset;
    val_tokens: validation row tokens to read (None: every row); *_new_tokens: greedy generation caps.
    """

    data: Path | None = None
    source_dir: Path | None = None
    max_examples: int = 20
    val_tokens: int | None = 65_536
    batch_tokens: int = 4096
    math_new_tokens: int = 256
    code_new_tokens: int = 256
    qa_new_tokens: int = 32
    sample_new_tokens: int = 64
    sandbox_timeout_s: float = 5.0
    sandbox_memory_mb: int = 512
    bf16: bool = False
    lm_eval_dir: Path | None = (
        None  # also run lm-evaluation-harness on the math and QA examples (tasks written here)
    )
    lm_eval_batch_size: int = 1

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)} must be at least 1"
            for name in (
                "max_examples",
                "batch_tokens",
                "math_new_tokens",
                "code_new_tokens",
                "qa_new_tokens",
                "sample_new_tokens",
                "lm_eval_batch_size",
            )
            if getattr(self, name) < 1
        ]
        if self.val_tokens is not None and self.val_tokens < 1:
            problems.append(f"val_tokens={self.val_tokens} must be at least 1 (or None for every row)")
        if self.sandbox_timeout_s <= 0:
            problems.append(f"sandbox_timeout_s={self.sandbox_timeout_s} must be positive")
        for name in ("data", "source_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                problems.append(f"{name}={folder} is not a folder")
        if problems:
            raise EvalError("invalid EvalConfig: " + "; ".join(problems))

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device(model: CognateModel) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------- entry points


def evaluate_model_dir(
    model_dir: Path, config: EvalConfig, device: str | torch.device = "cpu", log: Log = _stderr
) -> dict:
    """Load a model folder (weights and tokenizer), check it matches the data folder, and evaluate it."""
    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise EvalError(
            f"{model_dir} has no tokenizer.json: a model folder keeps the tokenizer it was trained with"
        )
    model_tokenizer = tokenizer_sha256(model_dir)  # of the native form: an hf_format folder's matches too
    if config.data is not None:
        data_sha256 = read_manifest(config.data)["tokenizer"]["sha256"]
        if data_sha256 != model_tokenizer:
            raise EvalError(
                f"the tokenizer of {config.data} (sha256 {data_sha256[:12]}...) is not the model's "
                f"({tokenizer_file}, sha256 {model_tokenizer[:12]}...): its token ids mean other text to this "
                "model; give the folder the model was trained on, or one prepared with --tokenizer MODEL_DIR"
            )
    model = load_model_dir(model_dir, device)
    hf_folder = model_dir / "hf_format" if (model_dir / "hf_format").is_dir() else model_dir
    report = evaluate(model, load_tokenizer(model_dir), config, log, hf_folder=hf_folder)
    report["model"] |= {"path": str(model_dir), "tokenizer_sha256": model_tokenizer}
    return report


def evaluate(
    model: CognateModel, tokenizer, config: EvalConfig, log: Log = _stderr, hf_folder: Path | None = None
) -> dict:
    """The report of `model` (in eval mode on its device) with its `tokenizer`; see docs/evaluation.md.
    `hf_folder`: the model's Hugging Face layout, which lm-eval loads (needed with config.lm_eval_dir)."""
    model.eval()
    cfg = model.cfg
    report: dict = {
        "format_version": REPORT_VERSION,
        "model": {
            "name": cfg.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "t_infer": cfg.t_infer,
            "act_enabled": cfg.act_enabled,
            "mem_enabled": cfg.mem_enabled,
        },
        "settings": config.to_json() | {"device": str(_device(model))},
    }
    skipped: dict[str, str] = {}
    timings: dict[str, float] = {}
    runner = _Runner(model, tokenizer, config)
    manifest = read_manifest(config.data) if config.data is not None else None

    started = time.perf_counter()
    if manifest is not None:
        log(f"validation: reading {config.data}")
        report |= validation_statistics(model, config, runner.autocast)
        if report["memory"] is None:
            skipped["memory"] = skipped["long_context"] = "the model's config has mem_enabled=false"
        if report["act"]["loss_step_correlation"] is None:
            skipped["act.loss_step_correlation"] = "every token halted at the same step"
    else:
        report |= {"validation": None, "act": None, "memory": None, "long_context": None}
        for section in ("validation", "act", "memory", "long_context"):
            skipped[section] = "needs --data DIR (a prepared folder with validation rows)"
    timings["validation"] = time.perf_counter() - started

    synthetic_data = manifest is not None and manifest.get("synthetic")
    run = _TaskRun(
        runner,
        config,
        split=HeldOutSplit.from_manifest(manifest) if manifest is not None else HeldOutSplit(),
        synthetic_training_seed=int(manifest["seed"]) if synthetic_data else tasks.DEFAULT_SPLIT_SEED,
        skips=SkipLog(),
        skipped=skipped,
        log=log,
    )
    for section, measure in (("math", math_section), ("mbpp", mbpp_section), ("qa", qa_section)):
        started = time.perf_counter()
        report[section] = measure(run)
        timings[section] = time.perf_counter() - started

    started = time.perf_counter()
    report["generation"] = generation_check(runner, config.sample_new_tokens)
    timings["generation"] = time.perf_counter() - started
    if config.lm_eval_dir is not None:
        if hf_folder is None:
            raise EvalError("lm_eval_dir needs the model's Hugging Face folder (hf_folder)")
        started = time.perf_counter()
        report["lm_eval"] = lm_eval_section(run, report, hf_folder, str(_device(model)))
        timings["lm_eval"] = time.perf_counter() - started
    if run.skips.examples:  # records or whole files
        report["skipped_records"] = run.skips.to_json()
    report["skipped"] = skipped
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return report


# ---------------------------------------------------------------------------------------------------- validation


@torch.inference_mode()
def validation_statistics(model: CognateModel, config: EvalConfig, autocast) -> dict:
    """Perplexity, ACT statistics and memory statistics over the prepared folder's validation rows.

    Returns {"validation": ..., "act": ..., "memory": ..., "long_context": ...}. Perplexity is exp of the
    token-weighted mean CE of the logits the model answers with in inference (each token's, at its halting step).
    A document longer than a row is read as in training: its rows in order, the memory carried from each to the
    next. "long_context" compares that with reading each of its rows alone.
    """
    cfg = model.cfg
    device = _device(model)
    datasets = {kind: PackedDataset(config.data, "validation", kind) for kind in KINDS}
    chosen = validation_rows(
        {k: (len(d), d.seq_len) for k, d in datasets.items()},
        config.val_tokens,
        {k: d.documents[:, 0] for k, d in datasets.items()},
    )
    if not any(len(rows) for rows in chosen.values()):
        raise EvalError(f"{config.data} has no validation rows")
    token_losses, token_steps = [], []
    step_sums = torch.zeros(cfg.t_infer, dtype=torch.float64)  # CE summed over tokens after each step
    by_kind, memory_by_kind = {}, {}
    long_context = _LongContextSums()
    for kind, rows in chosen.items():
        dataset = datasets[kind]
        per_batch = max(1, config.batch_tokens // dataset.seq_len)
        loss_sum, tokens, memory_sums = 0.0, 0, Counter()
        carried = CarriedMemory()
        for indices in stream_batches(rows, dataset.documents[:, 0], per_batch):
            input_ids, targets = (t.to(device) for t in dataset.batch(indices))
            documents = dataset.documents[indices]
            with autocast():
                out = model(input_ids, targets=targets, memory_state=carried.state_for((kind, 0), documents))
            carried.update((kind, 0), out.memory_state, documents)
            valid = targets != IGNORE_INDEX
            if cfg.mem_enabled and (documents[:, 0] >= 0).any():
                with autocast():
                    alone = model(input_ids, targets=targets).step_losses[-1]
                long_context.add(out.step_losses[-1], alone, valid, documents)
            losses = out.step_losses[-1]  # each token's CE at its halting step
            step_sums += torch.stack([step[valid].double().sum() for step in out.step_losses]).cpu()
            token_losses.append(losses[valid].cpu())
            token_steps.append(out.act["steps"][valid].cpu())
            loss_sum += float(losses[valid].double().sum())
            tokens += int(valid.sum())
            for name, value in out.memory.items():  # empty when memory did not run on these rows
                memory_sums[name] += float(value) * input_ids.size(0)
        by_kind[kind] = {
            "rows": len(rows),
            "rows_available": len(dataset),
            "tokens": tokens,
            "loss": loss_sum / tokens if tokens else None,
            "perplexity": metrics.perplexity_from_loss(loss_sum / tokens) if tokens else None,
        }
        memory_by_kind[kind] = _memory_entry(cfg, len(rows), memory_sums)
    losses = torch.cat(token_losses).double().numpy()
    steps = torch.cat(token_steps).numpy()
    mean_loss = float(losses.mean())
    validation = {
        "data": str(config.data),
        "tokens": len(losses),
        "loss": mean_loss,
        "perplexity": metrics.perplexity_from_loss(mean_loss),
        # What each refinement step adds: the loss if inference stopped after step t (halting still on).
        "loss_by_step": (step_sums / len(losses)).tolist(),
        "by_kind": by_kind,
    }
    memory = None
    if cfg.mem_enabled:
        memory = {
            "capacity": cfg.mem_capacity,
            "chunk_size": cfg.mem_chunk_size,
            "by_kind": memory_by_kind,
        }
    return {
        "validation": validation,
        "act": act_statistics(losses, steps, cfg),
        "memory": memory,
        "long_context": long_context.report() if cfg.mem_enabled else None,
    }


class _LongContextSums:
    """CE sums over the tokens of documents longer than a row: read with the memory carried from row to row,
    and each row alone; over all their rows and over their later rows (index >= 1, the ones a carry can help)."""

    def __init__(self):
        self.sums = {name: [0.0, 0.0, 0] for name in ("all", "later_rows")}  # carried, alone, tokens
        self.documents: set[int] = set()
        self.rows = 0

    def add(self, carried: torch.Tensor, alone: torch.Tensor, valid: torch.Tensor, documents: np.ndarray):
        in_document = torch.from_numpy(documents[:, 0] >= 0).to(valid.device)[:, None] & valid
        later = torch.from_numpy(documents[:, 1] >= 1).to(valid.device)[:, None] & in_document
        for name, mask in (("all", in_document), ("later_rows", later)):
            self.sums[name][0] += float(carried[mask].double().sum())
            self.sums[name][1] += float(alone[mask].double().sum())
            self.sums[name][2] += int(mask.sum())
        self.documents |= set(documents[documents[:, 0] >= 0, 0].tolist())
        self.rows += int((documents[:, 0] >= 0).sum())

    def report(self) -> dict:
        entry: dict = {"documents": len(self.documents), "rows": self.rows}
        for name, (carried, alone, tokens) in self.sums.items():
            prefix = "" if name == "all" else f"{name}_"
            entry[f"{prefix}tokens"] = tokens
            entry[f"{prefix}loss_carried_memory"] = carried / tokens if tokens else None
            entry[f"{prefix}loss_rows_alone"] = alone / tokens if tokens else None
        return entry


def validation_rows(
    available: dict[str, tuple[int, int]],
    token_budget: int | None,
    documents: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Which rows of each kind to read: {kind: (rows, seq_len)} -> {kind: row indices}, ascending.

    Within `token_budget` row tokens, every kind keeps the same share of its rows (at least one), so the
    perplexity is of the same short/long mix as the whole split; the rows are a fixed random subset, not the
    first ones, because packing puts the longest documents first. With `documents` (each row's document id,
    < 0 for rows of whole documents), a document longer than a row is kept or left out whole, so its rows can be
    read in order; the share is then met to within one document.
    """
    total = sum(n * seq_len for n, seq_len in available.values())
    share = 1.0 if token_budget is None or total <= token_budget else token_budget / total
    rng = np.random.default_rng(VALIDATION_SEED)
    chosen = {}
    for kind, (n, _) in available.items():
        keep = min(n, max(1, round(share * n))) if n else 0
        ids = documents.get(kind) if documents is not None else None
        if ids is None:
            chosen[kind] = np.sort(rng.permutation(n)[:keep])
            continue
        starts = _unit_starts(np.asarray(ids))
        sizes = np.diff(np.r_[starts, n])
        order = rng.permutation(len(starts))
        units = (
            order[: max(1, int(np.searchsorted(np.cumsum(sizes[order]), keep, side="right")))] if n else []
        )
        chosen[kind] = np.sort(
            np.concatenate([np.arange(starts[u], starts[u] + sizes[u]) for u in units] or [[]])
        )
        chosen[kind] = chosen[kind].astype(np.int64)
    return chosen


def _unit_starts(ids: np.ndarray) -> np.ndarray:
    """First row of each unit: a document longer than a row (its rows are stored together), or a single row."""
    return (
        np.flatnonzero(np.r_[True, (ids[1:] != ids[:-1]) | (ids[1:] < 0)]) if len(ids) else np.zeros(0, int)
    )


def stream_batches(rows: np.ndarray, ids: np.ndarray, n_streams: int) -> list[np.ndarray]:
    """Batches of `rows` (ascending, whole documents) read as `n_streams` parallel streams: each stream takes
    whole documents, so a document's rows come one per batch in the same batch row. Streams are longest first,
    so when the shorter ones run out the remaining batches hold the first rows (see `CarriedMemory.state_for`)."""
    if not len(rows):
        return []
    starts = _unit_starts(ids[rows])
    sizes = np.diff(np.r_[starts, len(rows)])
    stream_of = (starts * n_streams) // len(rows)  # balanced by rows; a unit never straddles two streams
    streams = sorted(
        (rows[np.flatnonzero(np.repeat(stream_of, sizes) == s)] for s in np.unique(stream_of)), key=len
    )
    streams = streams[::-1]
    return [np.array([stream[j] for stream in streams if len(stream) > j]) for j in range(len(streams[0]))]


def _memory_entry(cfg, rows: int, sums: Counter) -> dict:
    """Means over the rows (a row's figures are its batch's): write rate, read gate, live slots at the end."""
    active = bool(sums) and rows > 0
    entry: dict = {"active": active, "rows": rows}
    for name in ("write_rate", "read_gate", "slots_used"):
        entry[name] = sums[name] / rows if active else None
    if not active:
        entry["inactive_reason"] = (
            "memory is off in this model's config" if not cfg.mem_enabled else "no rows"
        )
    return entry


def act_statistics(losses: np.ndarray, steps: np.ndarray, cfg) -> dict:
    """Halting steps of the validation tokens: mean, variance, histogram, and against difficulty (the token's
    loss): the mean step in each loss quartile, and the Pearson correlation of loss and step."""
    quartile_edges = np.quantile(losses, [0.25, 0.5, 0.75])
    quartile = np.searchsorted(quartile_edges, losses, side="right")
    by_quartile = []
    for q in range(4):
        where = quartile == q
        if where.any():
            by_quartile.append(
                {
                    "quartile": q + 1,
                    "tokens": int(where.sum()),
                    "loss_min": float(losses[where].min()),
                    "loss_max": float(losses[where].max()),
                    "mean_steps": float(steps[where].mean()),
                }
            )
    counts = np.bincount(steps, minlength=cfg.t_infer + 1)[1:]
    varies = steps.std() > 0 and losses.std() > 0
    return {
        "enabled": cfg.act_enabled,
        "threshold": cfg.act_threshold,
        "max_steps": cfg.t_infer,
        "tokens": len(steps),
        "mean_steps": float(steps.mean()),
        "var_steps": float(steps.var()),
        "step_histogram": {str(s + 1): float(c / len(steps)) for s, c in enumerate(counts)},
        "steps_by_loss_quartile": by_quartile,
        "loss_step_correlation": float(np.corrcoef(losses, steps)[0, 1]) if varies else None,
    }


# ---------------------------------------------------------------------------------------------------- generation


class _Runner:
    """Greedy generation for one model and tokenizer: prompts in the training context, stop strings honoured."""

    def __init__(self, model: CognateModel, tokenizer, config: EvalConfig):
        self.model, self.tokenizer = model, tokenizer
        self.eos = tokenizer.eos_token_id
        self.device = _device(model)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if config.bf16
            else contextlib.nullcontext
        )

    def complete(
        self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]
    ) -> tuple[list[str], int]:
        """Greedy completions of `prompts` and how many prompts were cut (from the left) to fit the context.

        A prompt follows an end-of-text token, as a document does in the packed training rows; a longer prompt
        than the context has room for keeps its last `max_seq_len - max_new_tokens - 1` tokens.
        """
        room = max(1, self.model.cfg.max_seq_len - max_new_tokens - 1)
        completions, truncated = [], 0
        for ids in encode_texts(self.tokenizer, prompts):
            truncated += len(ids) > room
            ids = np.concatenate(([self.eos], ids[-room:]))
            prompt = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
            completions.append(self._greedy(prompt, max_new_tokens, stops))
        return completions, truncated

    def _greedy(self, prompt: torch.Tensor, max_new_tokens: int, stops: Sequence[str]) -> str:
        """Generated in pieces, so that a stop string ends the work early. Each piece re-reads the sequence so far,
        which gives the same tokens as one long call (generation is exact either way). Making each piece as long
        as all before it keeps the re-reads to about log2(max_new_tokens / STOP_CHECK_TOKENS), and the tokens
        generated past a stop to at most as many as came before it."""
        sequence, new, text = prompt, [], ""
        while len(new) < max_new_tokens:
            piece = min(max(STOP_CHECK_TOKENS, len(new)), max_new_tokens - len(new))
            with self.autocast():
                sequence = self.model.generate(sequence, piece, eos_token_id=self.eos)
            produced = sequence[0, prompt.size(1) + len(new) :].tolist()
            ended = self.eos in produced
            new += produced[: produced.index(self.eos)] if ended else produced
            text = self.tokenizer.decode(new)
            cut = _first_stop(text, stops)
            if cut is not None:
                return text[:cut]
            if ended or not produced:
                break
        return text


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generation_check(runner: _Runner, max_new_tokens: int) -> dict:
    """Greedy continuations of the fixed prompts and `metrics.detect_collapse` on them."""
    completions, _ = runner.complete(COLLAPSE_PROMPTS, max_new_tokens, stops=())
    return {
        **metrics.detect_collapse(completions),
        "max_new_tokens": max_new_tokens,
        "samples": [
            {"prompt": p, "completion": c} for p, c in zip(COLLAPSE_PROMPTS, completions, strict=True)
        ],
    }


# ---------------------------------------------------------------------------------------------------- tasks


@dataclass
class _TaskRun:
    """What the task sections share: generation, settings, the held-out split, and where to note what was left out."""

    runner: _Runner
    config: EvalConfig
    split: HeldOutSplit
    synthetic_training_seed: int  # the built-in curriculum whose problems synthetic examples must avoid
    skips: SkipLog  # malformed source records, skipped
    skipped: dict[str, str]  # section -> why it was not measured
    log: Log
    examples: dict[str, list[Example]] = field(default_factory=dict)  # section -> the examples it scored

    def load_each(self, section: str, names: Sequence[str], load) -> dict[str, list[Example]]:
        """{name: examples} of the sources that are there and hold held-out examples; the rest go to `skipped`."""
        loaded = {}
        for name in names:
            try:
                examples = load(
                    name, self.config.source_dir, self.split, self.config.max_examples, self.skips
                )
            except SourceUnavailable as error:
                self.skipped[f"{section}.{name}"] = str(error)
                continue
            if examples:
                loaded[name] = examples
            else:
                self.skipped[f"{section}.{name}"] = "no held-out documents (too few groups to hold any out)"
        if not loaded and names:
            self.skipped[section] = "no source had held-out examples"
        return loaded


def math_section(run: _TaskRun) -> dict | None:
    config = run.config
    if config.source_dir is None:
        seed = run.synthetic_training_seed
        examples = {"synthetic_arithmetic": tasks.synthetic_math_examples(config.max_examples, seed)}
        origin = {"synthetic": True, "seed": tasks.SYNTHETIC_EVAL_SEED, "excluded_training_seed": seed}
    else:
        examples = run.load_each("math", tasks.MATH_SOURCES, tasks.math_examples)
        origin = {"synthetic": False, "split": run.split.to_json()}
    if not examples:
        return None
    run.examples["math"] = [e for items in examples.values() for e in items]
    scored = {}
    for name, items in examples.items():
        completions, _ = run.runner.complete([e.prompt for e in items], config.math_new_tokens, MATH_STOPS)
        correct = [metrics.math_exact_match(c, e.answers[0]) for e, c in zip(items, completions, strict=True)]
        scored[name] = _accuracy(correct) | {
            "no_answer": sum(metrics.extract_math_answer(c) is None for c in completions),
            "predictions": [
                {"id": e.id, "question": e.question, "gold": e.answers[0], "completion": c, "correct": ok}
                for e, c, ok in zip(items, completions, correct, strict=True)
            ],
        }
        run.log(f"math {name}: {scored[name]['correct']}/{scored[name]['examples']} exact")
    return {**origin, "exact_match": _pooled(scored, "exact_match"), "sources": scored}


def mbpp_section(run: _TaskRun) -> dict | None:
    config = run.config
    if config.source_dir is None:
        run.skipped["mbpp"] = "needs --source-dir DIR (the raw sources, with mbpp/mbpp.jsonl)"
        return None
    try:
        examples = tasks.mbpp_examples(config.source_dir, config.max_examples, run.skips)
    except SourceUnavailable as error:
        run.skipped["mbpp"] = str(error)
        return None
    if not examples:
        run.skipped["mbpp"] = "mbpp/mbpp.jsonl has no task with an id in 11-510 (the test split)"
        return None
    completions, _ = run.runner.complete([e.prompt for e in examples], config.code_new_tokens, CODE_STOPS)

    def check(example: Example, code: str):
        return check_mbpp_solution(
            code,
            list(example.tests),
            example.test_setup,
            timeout_s=config.sandbox_timeout_s,
            memory_mb=config.sandbox_memory_mb,
        )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each check waits on a child process
        results = list(pool.map(check, examples, completions))
    outcomes = [
        "passed" if r.passed else r.killed_reason or ("failed" if r.returncode else "exited early")
        for r in results
    ]
    score = _accuracy([r.passed for r in results])
    run.log(f"mbpp: {score['correct']}/{score['examples']} passed")
    return {
        "examples": score["examples"],
        "passed": score["correct"],
        "pass_at_1": score["exact_match"],
        "stderr": score["stderr"],
        "outcomes": dict(Counter(outcomes)),
        "isolation": describe_isolation(),
        "limits": {"timeout_s": config.sandbox_timeout_s, "memory_mb": config.sandbox_memory_mb},
        "predictions": [
            {"task_id": int(e.id), "completion": c, "outcome": o}
            for e, c, o in zip(examples, completions, outcomes, strict=True)
        ],
    }


def qa_section(run: _TaskRun) -> dict | None:
    config = run.config
    if config.source_dir is None:
        run.skipped["qa"] = "needs --source-dir DIR (the raw sources: hotpotqa, 2wikimultihopqa, musique)"
        return None
    examples = run.load_each("qa", tasks.QA_SOURCES, tasks.qa_examples)
    if not examples:
        return None
    run.examples["qa"] = [e for items in examples.values() for e in items]
    scored = {}
    for name, items in examples.items():
        completions, truncated = run.runner.complete(
            [e.prompt for e in items], config.qa_new_tokens, QA_STOPS
        )
        em = [metrics.qa_exact_match(c, e.answers) for e, c in zip(items, completions, strict=True)]
        f1 = [metrics.qa_f1(c, e.answers) for e, c in zip(items, completions, strict=True)]
        scored[name] = {
            "examples": len(items),
            "exact_match": float(np.mean(em)),
            "f1": float(np.mean(f1)),
            "truncated_prompts": truncated,
            "predictions": [
                {
                    "id": e.id,
                    "question": e.question,
                    "gold": list(e.answers),
                    "completion": c,
                    "em": m,
                    "f1": f,
                }
                for e, c, m, f in zip(items, completions, em, f1, strict=True)
            ],
        }
        run.log(f"qa {name}: EM {scored[name]['exact_match']:.3f}, F1 {scored[name]['f1']:.3f}")
    return {
        "split": run.split.to_json(),
        "exact_match": _pooled(scored, "exact_match"),
        "f1": _pooled(scored, "f1"),
        "sources": scored,
    }


def lm_eval_section(run: _TaskRun, report: dict, hf_folder: Path, device: str) -> dict:
    """lm-evaluation-harness on the examples the math and QA sections scored, beside our figures.

    `same_completions`: the share of examples whose lm-eval completion is ours, so that a difference between the
    figures is known to come from the metrics (see cognate.eval.lm_eval_tasks), not from the generations. lm-eval
    decodes without special tokens (a generated <|pad|>, say), which ours keep: they are left out of the comparison.
    """
    config = run.config
    special = run.runner.tokenizer.all_special_tokens
    plans = {
        "math": (lm_eval_tasks.MATH_TASK, MATH_STOPS, config.math_new_tokens),
        "qa": (lm_eval_tasks.QA_TASK, QA_STOPS, config.qa_new_tokens),
    }
    sections = [section for section in plans if run.examples.get(section)]
    for section in sections:
        task, stops, new_tokens = plans[section]
        lm_eval_tasks.write_task(config.lm_eval_dir, task, run.examples[section], stops, new_tokens)
    run.log(f"lm-eval: {', '.join(plans[s][0] for s in sections)} in {config.lm_eval_dir}")
    figures, completions = lm_eval_tasks.run_lm_eval(
        hf_folder, config.lm_eval_dir, [plans[s][0] for s in sections], device, config.lm_eval_batch_size
    )
    tasks_report = {}
    for section in sections:
        task = plans[section][0]
        ours = [
            _without(p["completion"], special)
            for entry in report[section]["sources"].values()
            for p in entry["predictions"]
        ]
        theirs = completions[task]
        tasks_report[task] = {
            "examples": len(ours),
            "lm_eval": figures[task],
            "ours": {"exact_match": report[section]["exact_match"]},
            "same_completions": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours),
        }
    return {
        "tasks_dir": str(config.lm_eval_dir),
        "model": str(hf_folder),
        "batch_size": config.lm_eval_batch_size,
        "tasks": tasks_report,
    }


def _without(text: str, tokens: Sequence[str]) -> str:
    for token in tokens:
        text = text.replace(token, "")
    return text


def _accuracy(correct: list[bool]) -> dict:
    """Share correct with its standard error (binomial): with tens of examples the error is large; say so."""
    n, k = len(correct), sum(correct)
    p = k / n
    return {"examples": n, "correct": k, "exact_match": p, "stderr": math.sqrt(p * (1 - p) / n)}


def _pooled(scored: dict[str, dict], key: str) -> float | None:
    """The mean over all examples of every source (sources weighted by their number of examples)."""
    n = sum(s["examples"] for s in scored.values())
    return sum(s[key] * s["examples"] for s in scored.values()) / n if n else None
