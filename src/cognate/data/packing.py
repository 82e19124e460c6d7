"""Packing documents into fixed-length rows, with numpy (no per-token Python).

A row holds `seq_len + 1` tokens, so a model reads `row[:-1]` and predicts `row[1:]`. Each document ends with
the eos token. Documents are packed whole where they fit (best-fit decreasing, which leaves little padding); a
document longer than a row is cut into consecutive pieces that overlap by one token, so every next-token pair of
the document is a target exactly once. Pieces and short documents share rows with other documents; the reader
masks the target at every eos (its "next token" belongs to another document) and at every pad.
"""

from __future__ import annotations

import numpy as np


def split_into_pieces(starts: np.ndarray, lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut documents (given as start/length in a token array) into pieces of at most `row_len` tokens, each
    piece starting on the last token of the previous one."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    step = row_len - 1
    pieces = np.where(lengths > row_len, -(-(lengths - 1) // step), 1)
    document = np.repeat(np.arange(len(lengths)), pieces)
    index_in_document = np.arange(len(document)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = index_in_document * step
    return starts[document] + offset, np.minimum(row_len, lengths[document] - offset)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign items to bins: returns (bin, offset) per item and the number of bins.

    Items are placed longest first into the fullest bin that still has room. Bins are bucketed by remaining
    room, so finding one is a numpy scan over `capacity` counters, not over the bins.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    offset_of = np.empty(len(lengths), dtype=np.int64)
    open_bins = np.zeros(capacity + 1, dtype=np.int64)  # how many bins have each amount of room
    bins_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    n_bins = 0
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
) -> np.ndarray:
    """Rows of `row_len` tokens holding every document (start/length into `tokens`, eos included), pad after."""
    piece_starts, piece_lengths = split_into_pieces(starts, lengths, row_len)
    rows, offsets, n_rows = best_fit_decreasing(piece_lengths, row_len)
    out = np.full((n_rows, row_len), pad_id, dtype=tokens.dtype)
    total = int(piece_lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(piece_lengths) - piece_lengths, piece_lengths)
    source = np.repeat(piece_starts, piece_lengths) + within
    target = np.repeat(rows * row_len + offsets, piece_lengths) + within
    out.reshape(-1)[target] = tokens[source]
    return out


def loss_targets(rows: np.ndarray, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) from packed rows: targets shifted by one, -100 where the label must not be learned."""
    inputs = rows[..., :-1].astype(np.int64)
    targets = rows[..., 1:].astype(np.int64)
    targets[(inputs == eos_id) | (targets == pad_id)] = -100
    return inputs, targets
