"""Packing documents into fixed-length rows, with numpy (no per-token Python).

A row holds `seq_len + 1` tokens, so a model reads `row[:-1]` and predicts `row[1:]`. Each document ends with
the eos token. Documents that fit in a row are packed whole (best-fit decreasing, which leaves little padding). A
document longer than a row is cut into consecutive pieces that overlap by one token, so every next-token pair of
the document is a target exactly once and the inputs of its rows (`row[:-1]`) are its tokens end to end. Each
piece starts its own row: every piece but the last fills it, and whole documents fill the room after the last. So
a long document is a run of rows read in order, as consecutive segments of one sequence (the trainer carries the
model's memory from one to the next); each row records its document and its index in it. The
reader masks the target at every eos (its "next token" belongs to another document) and at every pad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Document id of a row that holds only whole documents (none continues in another row).
NO_DOCUMENT = -1


@dataclass(frozen=True)
class Pieces:
    """Documents cut into pieces of at most a row: each piece's start and length in the token array, the
    document it comes from and its index there (0, 1, ... in reading order)."""

    starts: np.ndarray
    lengths: np.ndarray
    document: np.ndarray
    index: np.ndarray

    @property
    def multi_row(self) -> np.ndarray:
        """Whether each piece's document spans several rows."""
        last = np.r_[self.document[1:] != self.document[:-1], True]
        return ~(last & (self.index == 0))


def split_into_pieces(starts: np.ndarray, lengths: np.ndarray, row_len: int) -> Pieces:
    """Cut documents (given as start/length in a token array) into pieces of at most `row_len` tokens, each
    piece starting on the last token of the previous one."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    step = row_len - 1
    pieces = np.where(lengths > row_len, -(-(lengths - 1) // step), 1)
    document = np.repeat(np.arange(len(lengths)), pieces)
    index_in_document = np.arange(len(document)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = index_in_document * step
    return Pieces(
        starts[document] + offset,
        np.minimum(row_len, lengths[document] - offset),
        document,
        index_in_document,
    )


def best_fit_decreasing(
    lengths: np.ndarray, capacity: int, initial_room: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign items to bins: returns (bin, offset) per item and the number of bins.

    Items are placed longest first into the fullest bin that still has room. Bins are bucketed by remaining
    room, so finding one is a numpy scan over `capacity` counters, not over the bins. `initial_room`: bins that
    already exist (numbered first), each filled from offset 0 up to `capacity - room`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    offset_of = np.empty(len(lengths), dtype=np.int64)
    initial_room = np.zeros(0, dtype=np.int64) if initial_room is None else np.asarray(initial_room)
    open_bins = np.bincount(initial_room[initial_room > 0], minlength=capacity + 1)  # bins with each room
    bins_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    for number in np.flatnonzero(initial_room > 0)[::-1]:  # popped from the end: lowest number first
        bins_with_room[initial_room[number]].append(int(number))
    n_bins = len(initial_room)
    for item in np.argsort(-lengths, kind="stable"):
        size = int(lengths[item])
        candidates = np.flatnonzero(open_bins[size:])
        if len(candidates):
            room = size + int(candidates[0])
            open_bins[room] -= 1
            target = bins_with_room[room].pop()
        else:
            room, target = capacity, n_bins
            n_bins += 1
        bin_of[item], offset_of[item] = target, capacity - room
        if room - size:
            open_bins[room - size] += 1
            bins_with_room[room - size].append(target)
    return bin_of, offset_of, n_bins


def pack_rows(
    tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, row_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `row_len` tokens holding every document (start/length into `tokens`, eos included), pad after;
    and each row's (document, index in it) as int64 [n_rows, 2].

    The pieces of documents longer than a row come first, one per row, each document's in order; its rows carry
    the document's number (its position in `starts`) and 0, 1, ...; rows of whole documents only carry
    (NO_DOCUMENT, 0).
    """
    pieces = split_into_pieces(starts, lengths, row_len)
    own_row = pieces.multi_row
    n_own = int(own_row.sum())
    whole = np.flatnonzero(~own_row)
    bins, offsets, n_rows = best_fit_decreasing(
        pieces.lengths[whole], row_len, initial_room=row_len - pieces.lengths[own_row]
    )
    rows = np.empty(len(pieces.lengths), dtype=np.int64)
    offset = np.zeros(len(pieces.lengths), dtype=np.int64)
    rows[own_row], rows[whole], offset[whole] = np.arange(n_own), bins, offsets
    out = np.full((n_rows, row_len), pad_id, dtype=tokens.dtype)
    total = int(pieces.lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(pieces.lengths) - pieces.lengths, pieces.lengths)
    source = np.repeat(pieces.starts, pieces.lengths) + within
    target = np.repeat(rows * row_len + offset, pieces.lengths) + within
    out.reshape(-1)[target] = tokens[source]
    documents = np.zeros((len(out), 2), dtype=np.int64)
    documents[:, 0] = NO_DOCUMENT
    documents[:n_own, 0], documents[:n_own, 1] = pieces.document[own_row], pieces.index[own_row]
    return out, documents


def loss_targets(rows: np.ndarray, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) from packed rows: targets shifted by one, -100 where the label must not be learned."""
    inputs = rows[..., :-1].astype(np.int64)
    targets = rows[..., 1:].astype(np.int64)
    targets[(inputs == eos_id) | (targets == pad_id)] = -100
    return inputs, targets
