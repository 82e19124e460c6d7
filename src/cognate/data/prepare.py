"""`prepare`: sources -> documents -> split -> infill -> tokenizer -> tokens -> mix -> packed shards + manifest.

Everything is written into a temporary folder beside OUT and renamed to OUT at the very end, so a failed or
interrupted run never leaves a folder that looks like a finished dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cognate.data import curriculum, synthetic
from cognate.data import sources as src
from cognate.data.dataset import KINDS, MANIFEST, SPLITS, row_documents_path
from cognate.data.formatting import Document
from cognate.data.packing import pack_rows
from cognate.data.readers import SkipLog
from cognate.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    complete_special_tokens,
    encode_texts,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

# 2: each split and kind also stores its rows' (document, index in it), `{split}/{kind}-documents.npy`.
FORMAT_VERSION = 2
BUILTIN_VOCAB_SIZE = 4096
MAX_LONG_LEN = 8192
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard file


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PrepareConfig:
    """What `cognate data prepare` does. Exactly one of `source_dir`, `builtin` and `hub` says where data comes
    from; `tokenizer` is a tokenizer to use instead of training one."""

    out: Path
    source_dir: Path | None = None
    builtin: bool = False
    hub: bool = False
    tokenizer: Path | None = None
    vocab_size: int | None = None
    short_ratio: float = 0.45
    short_len: int = 512
    long_len: int = 4096
    validation_fraction: float = 0.05
    infill_rate: float = 0.1
    mix: str = curriculum.DOWNSAMPLE
    seed: int = 0
    skip_bad: bool = False
    allow_missing: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if (self.source_dir is not None) + self.builtin + self.hub != 1:
            raise ConfigError("give exactly one of source_dir, builtin and hub")
        if self.source_dir is not None and not Path(self.source_dir).is_dir():
            raise ConfigError(f"source_dir {self.source_dir} is not a folder")
        if not 0 < self.short_ratio < 1:
            raise ConfigError(f"short_ratio must be in (0, 1), got {self.short_ratio}")
        if not 0 < self.short_len < self.long_len <= MAX_LONG_LEN:
            raise ConfigError(
                f"need 0 < short_len < long_len <= {MAX_LONG_LEN}, got short_len={self.short_len}, "
                f"long_len={self.long_len}"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.infill_rate <= 1:
            raise ConfigError(f"infill_rate must be in [0, 1], got {self.infill_rate}")
        if self.mix not in (curriculum.DOWNSAMPLE, curriculum.REPEAT):
            raise ConfigError(
                f"mix must be '{curriculum.DOWNSAMPLE}' or '{curriculum.REPEAT}', got {self.mix!r}"
            )
        if self.vocab_size is not None and self.tokenizer is not None:
            raise ConfigError("vocab_size applies to a trained tokenizer; a given tokenizer has its own")

    @property
    def trained_vocab_size(self) -> int:
        return self.vocab_size or (BUILTIN_VOCAB_SIZE if self.builtin else DEFAULT_VOCAB_SIZE)

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


class MissingSourcesError(FileNotFoundError):
    pass


@dataclass
class Corpus:
    """Documents of every available source, with what was read to get them."""

    documents: list[Document]
    sides: dict[str, str]
    inputs: list[dict] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    synthetic: bool = False


def collect(config: PrepareConfig, skips: SkipLog | None, log: Callable[[str], None] = print) -> Corpus:
    """Load every source (or generate the built-in curriculum). Missing sources stop the run unless allowed."""
    if config.builtin:
        generated = synthetic.generate(config.seed)
        documents = [d for name in generated for d in generated[name]]
        return Corpus(documents, {**synthetic.SIDES, src.INFILL: src.SHORT}, synthetic=True)
    corpus = Corpus([], dict(src.SIDES))
    if config.source_dir is not None:
        for name, source in src.SOURCES.items():
            if absent := src.missing_files(source, Path(config.source_dir)):
                corpus.missing[name] = f"missing {', '.join(absent)}"
    for name, source in src.SOURCES.items():
        if name in corpus.missing:
            continue
        if config.hub:
            loaded = src.load_hub(source, skips)
        else:
            loaded = src.load_local(source, Path(config.source_dir), skips)
        if not loaded.documents:
            corpus.missing[name] = "no usable records"
            continue
        corpus.documents += loaded.documents
        corpus.inputs += [{"source": name, **entry} for entry in loaded.inputs]
        corpus.excluded[name] = loaded.excluded
    _check_missing(corpus.missing, config.allow_missing, log)
    return corpus


def _check_missing(missing: dict[str, str], allowed: bool, log: Callable[[str], None]) -> None:
    if not missing:
        return
    listing = "; ".join(f"{name}: {why}" for name, why in missing.items())
    if not allowed:
        raise MissingSourcesError(
            f"sources not available ({listing}); pass --allow-missing to go on without them"
        )
    log(f"skipping sources ({listing})")


@dataclass
class Encoded:
    """All documents' tokens end to end (each document closed by eos), with each one's start and length."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def encode_documents(tokenizer, documents: Sequence[Document]) -> Encoded:
    special = special_token_ids(tokenizer)
    pieces = [d.pieces() for d in documents]
    encoded = iter(encode_texts(tokenizer, [p for doc_pieces in pieces for p in doc_pieces]))
    eos = np.array([special.eos], dtype=np.int32)
    markers = [
        np.array([m], dtype=np.int32) for m in (special.fim_prefix, special.fim_suffix, special.fim_middle)
    ]
    parts: list[np.ndarray] = []
    lengths = np.empty(len(documents), dtype=np.int64)
    for index, doc_pieces in enumerate(pieces):
        before = len(parts)
        if len(doc_pieces) == 1:
            parts.append(next(encoded))
        else:  # <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
            for marker in markers:
                parts += [marker, next(encoded)]
        parts.append(eos)
        lengths[index] = sum(len(p) for p in parts[before:])
    tokens = np.concatenate(parts).astype(np.uint16) if parts else np.empty(0, dtype=np.uint16)
    return Encoded(tokens, np.cumsum(lengths) - lengths, lengths)


def prepare(config: PrepareConfig, log: Callable[[str], None] = print) -> dict:
    """Build the prepared folder `config.out` and return its manifest."""
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    timer = _Timer()
    skips = SkipLog() if config.skip_bad else None
    if config.builtin:
        log(
            "preparing the built-in SYNTHETIC curriculum (generated, not real data; --source-dir DIR reads real files)"
        )
    corpus = collect(config, skips, log)
    timer.lap("load")
    train_docs, validation_docs = split_documents(corpus, config)
    documents = train_docs + validation_docs
    timer.lap("split")
    tokenizer, learned_from = _tokenizer(config, corpus, train_docs)
    timer.lap("tokenizer")
    encoded = encode_documents(tokenizer, documents)
    timer.lap("encode")
    special = special_token_ids(tokenizer)
    indices = {"train": np.arange(len(train_docs)), "validation": np.arange(len(train_docs), len(documents))}

    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer_hash = save_tokenizer(tokenizer, tmp)
        splits, shards = {}, {}
        for split in SPLITS:
            splits[split] = _mix_split(documents, indices[split], encoded, corpus.sides, config, split)
        timer.lap("mix")
        packed, documents = {}, {}
        for split in SPLITS:
            both = _pack_split(splits[split]["rows_of"], encoded, config, special.pad)
            packed[split] = {kind: rows for kind, (rows, _) in both.items()}
            documents[split] = {kind: docs for kind, (_, docs) in both.items()}
        timer.lap("pack")
        for split in SPLITS:
            shards[split] = {kind: _write_shards(tmp, split, kind, packed[split][kind]) for kind in KINDS}
            for kind in KINDS:
                np.save(tmp / row_documents_path(split, kind), documents[split][kind], allow_pickle=False)
        timer.lap("write")
        manifest = _manifest(
            config, corpus, skips, splits, packed, shards, tokenizer, special, tokenizer_hash, documents
        )
        read, stored = (
            int(encoded.lengths.sum()),
            sum(int(r.size) for p in packed.values() for r in p.values()),
        )
        manifest["timings"] = timer.report(
            {"load": read, "split": read, "encode": read, "mix": read, "pack": stored, "write": stored}
            | (
                {"tokenizer": int(encoded.lengths[: len(train_docs)][learned_from].sum())}
                if learned_from.any()
                else {}
            )
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tokenizer(config: PrepareConfig, corpus: Corpus, train_docs: list[Document]):
    """The given tokenizer, or one trained on the training documents; and which documents it learned from."""
    if config.tokenizer is not None:
        return complete_special_tokens(load_tokenizer(config.tokenizer)), np.zeros(
            len(train_docs), dtype=bool
        )
    selected = tokenizer_selection(train_docs, corpus.sides, config)
    texts = [d.text for d, keep in zip(train_docs, selected.tolist(), strict=True) if keep]
    return train_tokenizer(texts, config.trained_vocab_size), selected


def split_documents(corpus: Corpus, config: PrepareConfig) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents, split by group, then each side's share of short documents made infill."""
    train, validation = curriculum.split_by_group(corpus.documents, config.validation_fraction, config.seed)
    return _infill(train, corpus.sides, config), _infill(validation, corpus.sides, config)


def tokenizer_selection(
    train_docs: list[Document], sides: dict[str, str], config: PrepareConfig
) -> np.ndarray:
    """Which training documents the tokenizer learns from: those the mix will use, chosen before there are
    tokens to count (characters stand in for tokens), so it learns the curriculum's proportions, not the raw
    sources' (CodeXGLUE alone is half of the real short-side text)."""
    characters = np.array([len(d.text) for d in train_docs], dtype=np.int64)
    return (
        curriculum.mix(train_docs, characters, sides, config.short_ratio, config.mix, config.seed).copies > 0
    )


def _infill(documents: list[Document], sides: dict[str, str], config: PrepareConfig) -> list[Document]:
    short = [d for d in documents if sides[d.source] == src.SHORT]
    rest = [d for d in documents if sides[d.source] != src.SHORT]
    return curriculum.make_infill(short, config.infill_rate, config.seed) + rest


def _mix_split(documents, indices, encoded: Encoded, sides, config: PrepareConfig, split: str) -> dict:
    docs = [documents[i] for i in indices]
    lengths = encoded.lengths[indices]
    if split == "validation" and len({sides[d.source] for d in docs}) < 2:
        # Too few held-out documents to have both sides: validation is kept whole rather than failing the run.
        mixed = curriculum.MixResult(np.ones(len(docs), dtype=np.int64), {d.source: 1.0 for d in docs})
    else:
        # Validation is never repeated: it only down-samples to the same mix.
        strategy = config.mix if split == "train" else curriculum.DOWNSAMPLE
        mixed = curriculum.mix(docs, lengths, sides, config.short_ratio, strategy, config.seed)
    chosen = np.repeat(indices, mixed.copies)
    long_row = np.array([sides[documents[i].source] == src.LONG for i in chosen], dtype=bool)
    long_row |= encoded.lengths[chosen] > config.short_len + 1  # a long short-side document would be cut
    per_source: dict[str, dict] = {}
    for document, length, copies in zip(docs, lengths.tolist(), mixed.copies.tolist(), strict=True):
        entry = per_source.setdefault(
            document.source,
            {"documents": 0, "tokens": 0, "available_documents": 0, "available_tokens": 0},
        )
        entry["available_documents"] += 1
        entry["available_tokens"] += length
        entry["documents"] += copies > 0
        entry["tokens"] += length * copies
    for name, entry in per_source.items():
        entry["use_factor"] = round(mixed.source_factor[name], 4)
    short_tokens = sum(e["tokens"] for n, e in per_source.items() if sides[n] == src.SHORT)
    total = sum(e["tokens"] for e in per_source.values())
    return {
        "sources": per_source,
        "short_ratio": short_tokens / total if total else 0.0,
        "rows_of": {"short": chosen[~long_row], "long": chosen[long_row]},
    }


def _pack_split(rows_of: dict[str, np.ndarray], encoded: Encoded, config: PrepareConfig, pad: int) -> dict:
    lengths = {"short": config.short_len, "long": config.long_len}
    return {
        kind: pack_rows(
            encoded.tokens,
            encoded.starts[rows_of[kind]],
            encoded.lengths[rows_of[kind]],
            lengths[kind] + 1,
            pad,
        )
        for kind in KINDS
    }


def _write_shards(folder: Path, split: str, kind: str, rows: np.ndarray) -> list[dict]:
    (folder / split).mkdir(exist_ok=True)
    per_shard = max(1, SHARD_TOKENS // rows.shape[1])
    shards = []
    for number, start in enumerate(range(0, max(len(rows), 1), per_shard)):
        part = np.ascontiguousarray(rows[start : start + per_shard], dtype=np.uint16)
        path = f"{split}/{kind}-{number:05d}.bin"
        part.tofile(folder / path)
        shards.append({"path": path, "rows": len(part), "sha256": hashlib.sha256(part.tobytes()).hexdigest()})
    return shards


def _manifest(
    config, corpus: Corpus, skips, splits, packed, shards, tokenizer, special, tokenizer_hash, documents
) -> dict:
    names = [n for n in (*src.SOURCE_ORDER, *synthetic.SIDES) if n in corpus.sides]
    sources = {}
    for name in names:
        if not any(name in splits[s]["sources"] for s in SPLITS):
            continue
        empty = {
            "documents": 0,
            "tokens": 0,
            "available_documents": 0,
            "available_tokens": 0,
            "use_factor": 0.0,
        }
        sources[name] = {
            "side": corpus.sides[name],
            **{split: splits[split]["sources"].get(name, empty) for split in SPLITS},
        }
        if name in corpus.excluded:
            sources[name]["excluded_records"] = corpus.excluded[name]
    rows = {
        split: {
            kind: {
                "rows": len(packed[split][kind]),
                "tokens": int((packed[split][kind] != special.pad).sum()),
                "padding_fraction": round(float((packed[split][kind] == special.pad).mean()), 4)
                if packed[split][kind].size
                else 0.0,
                # documents longer than a row, each stored as a run of rows read in order
                "multi_row_documents": len(np.unique(documents[split][kind][:, 0].clip(min=-1))) - 1,
            }
            for kind in KINDS
        }
        for split in SPLITS
    }
    return {
        "format_version": FORMAT_VERSION,
        "synthetic": corpus.synthetic,
        "seed": config.seed,
        "config": config.to_json(),
        "vocab_size": len(tokenizer),
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": tokenizer_hash,
            "trained": config.tokenizer is None,
            "vocab_size": len(tokenizer),
            "special_token_ids": dataclasses.asdict(special),
        },
        "dtype": "uint16",
        "sequence_lengths": {"short": config.short_len, "long": config.long_len},
        "row_tokens": {"short": config.short_len + 1, "long": config.long_len + 1},
        "target_short_ratio": config.short_ratio,
        "short_ratio": round(splits["train"]["short_ratio"], 4),
        "validation_short_ratio": round(splits["validation"]["short_ratio"], 4),
        "mix": config.mix,
        "sources": sources,
        "missing_sources": corpus.missing,
        "skipped_records": skips.to_json() if skips is not None else {},
        "inputs": corpus.inputs,
        "rows": rows,
        "shards": shards,
        "row_documents": {
            split: {kind: row_documents_path(split, kind) for kind in KINDS} for split in SPLITS
        },
    }


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the `.OUT.tmp-PID` and `.OUT.old-PID` folders of earlier runs that were killed (their process is
    gone); a live process's folders are left alone. Returns what was deleted."""
    removed = []
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name.removeprefix(f".{out.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old OUT (only with --overwrite) is removed after the swap."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


class _Timer:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.last
        self.last = now

    def report(self, tokens: dict[str, int]) -> dict:
        """Seconds and tokens per second of each stage; a stage without a token count (a tokenizer that was
        given, not trained) reports its seconds only."""
        report = {}
        for stage, seconds in self.seconds.items():
            report[stage] = {"seconds": round(seconds, 3)}
            if stage in tokens:
                report[stage] |= {
                    "tokens": tokens[stage],
                    "tokens_per_second": round(tokens[stage] / seconds) if seconds > 0 else None,
                }
        report["total_seconds"] = round(time.perf_counter() - self.start, 3)
        return report
