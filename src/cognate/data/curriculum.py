"""Splitting, infill and mixing: which documents train, which validate, and how often each is seen.

Every random choice here is a hash of (seed, purpose, source, group), not a draw from a shared generator, so a
document's fate does not depend on the order the sources were read in or on what else is in the folder.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cognate.data.formatting import Document
from cognate.data.sources import INFILL, SHORT

DOWNSAMPLE, REPEAT = "downsample", "repeat"


def unit_hash(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) determined by the seed and `parts`."""
    digest = hashlib.blake2b("\x1f".join((str(seed), *parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_by_group(
    documents: Sequence[Document], validation_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out `validation_fraction` of each source's groups (at least one when a source has two or more), so
    every question about one article, or every copy of one record, stays on one side."""
    train: list[Document] = []
    validation: list[Document] = []
    by_source: dict[str, list[Document]] = {}
    for document in documents:
        by_source.setdefault(document.source, []).append(document)
    for source, docs in by_source.items():
        groups = sorted({d.group for d in docs}, key=lambda g: unit_hash(seed, "split", source, g))
        held = (
            0
            if len(groups) < 2 or validation_fraction == 0
            else max(1, round(validation_fraction * len(groups)))
        )
        held_out = set(groups[:held])
        for document in docs:
            (validation if document.group in held_out else train).append(document)
    return train, validation


def make_infill(documents: Sequence[Document], rate: float, seed: int) -> list[Document]:
    """Turn a `rate` share of the short-side documents into fill-in-the-middle ("infill") documents.

    As in Bavarian et al. (2022), the transformation replaces the document (it is not a copy) and the middle is
    cut at two character positions drawn uniformly; the pieces are tokenized separately.
    """
    result = []
    for document in documents:
        if len(document.text) >= 3 and unit_hash(seed, "infill", document.source, document.group) < rate:
            rng = random.Random(f"{seed}:{document.source}:{document.group}")
            start, end = sorted(rng.sample(range(1, len(document.text)), 2))
            document = replace(document, source=INFILL, fim_span=(start, end))
        result.append(document)
    return result


@dataclass(frozen=True)
class MixResult:
    copies: np.ndarray  # per document: 0 (left out), 1, or more (repeated)
    source_factor: dict[str, float]  # tokens used / tokens available, per source


def mix(
    documents: Sequence[Document],
    lengths: np.ndarray,
    sides: dict[str, str],
    short_ratio: float,
    strategy: str,
    seed: int,
) -> MixResult:
    """Choose how often each document is used so that short-side tokens make up `short_ratio` of the total.

    `downsample` leaves documents out of the larger side, trimming its largest sources first ("water filling":
    every source keeps min(its tokens, c) for the c that hits the target), so small sources stay whole.
    `repeat` uses the smaller side `factor` times (whole copies, plus one more copy of a hash-chosen share of its
    documents for the fraction), keeping every document of the larger side.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    is_short = np.array([sides[d.source] == SHORT for d in documents], dtype=bool)
    short_tokens, long_tokens = int(lengths[is_short].sum()), int(lengths[~is_short].sum())
    copies = np.ones(len(documents), dtype=np.int64)
    if short_tokens == 0 or long_tokens == 0:
        raise ValueError(
            f"cannot mix to short_ratio={short_ratio}: no {'short' if short_tokens == 0 else 'long'}-side documents"
        )
    short_is_larger = short_tokens / (short_tokens + long_tokens) > short_ratio
    target_short = short_ratio / (1 - short_ratio) * long_tokens
    target_long = (1 - short_ratio) / short_ratio * short_tokens
    order = np.array([unit_hash(seed, "mix", d.source, d.group) for d in documents]).argsort(kind="stable")
    if strategy == DOWNSAMPLE:
        side = is_short if short_is_larger else ~is_short
        _water_fill(documents, lengths, side, target_short if short_is_larger else target_long, order, copies)
    elif strategy == REPEAT:
        side = ~is_short if short_is_larger else is_short
        factor = (target_long / long_tokens) if short_is_larger else (target_short / short_tokens)
        _repeat(lengths, side, factor, order, copies)
    else:
        raise ValueError(f"unknown mixing strategy {strategy!r} (choose '{DOWNSAMPLE}' or '{REPEAT}')")
    used: dict[str, int] = {}
    available: dict[str, int] = {}
    for document, length, count in zip(documents, lengths.tolist(), copies.tolist(), strict=True):
        available[document.source] = available.get(document.source, 0) + length
        used[document.source] = used.get(document.source, 0) + length * count
    return MixResult(copies, {s: used[s] / available[s] for s in available})


def _water_fill(documents, lengths, side: np.ndarray, target: float, order: np.ndarray, copies: np.ndarray):
    sources = sorted({documents[i].source for i in np.flatnonzero(side)})
    totals = {s: 0 for s in sources}
    for i in np.flatnonzero(side):
        totals[documents[i].source] += int(lengths[i])
    cap = _water_level(sorted(totals.values()), target)
    kept = dict.fromkeys(sources, 0)
    for i in order:
        if not side[i]:
            continue
        source = documents[i].source
        # Keep a document when that brings the source nearer its cap than leaving it out would.
        if kept[source] + lengths[i] / 2 <= cap:
            kept[source] += int(lengths[i])
        else:
            copies[i] = 0


def _water_level(totals: list[int], target: float) -> float:
    """The c with sum(min(t, c) for t in totals) == target, for ascending `totals`."""
    remaining = target
    for index, total in enumerate(totals):
        share = remaining / (len(totals) - index)
        if total >= share:
            return share
        remaining -= total
    return math.inf


def _repeat(lengths: np.ndarray, side: np.ndarray, factor: float, order: np.ndarray, copies: np.ndarray):
    whole = math.floor(factor)
    copies[side] = whole
    extra_tokens = (factor - whole) * lengths[side].sum()
    added = 0
    for i in order:
        if side[i] and added + lengths[i] / 2 <= extra_tokens:
            copies[i] += 1
            added += int(lengths[i])
