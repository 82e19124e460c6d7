"""Packing: every next-token pair of every document is a target exactly once, and none crosses documents."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.data.packing import NO_DOCUMENT, best_fit_decreasing, loss_targets, pack_rows, split_into_pieces

PAD, EOS = 0, 1


def make_documents(lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents whose tokens name (document, position) uniquely, each closed by EOS."""
    parts, starts, position = [], [], 0
    for doc, length in enumerate(lengths):
        body = 2 + (doc * 1000 + np.arange(length - 1)) % 60_000
        parts.append(np.append(body, EOS).astype(np.uint16))
        starts.append(position)
        position += length
    return np.concatenate(parts), np.array(starts), np.array(lengths)


def document_pairs(tokens, starts, lengths) -> list[tuple[int, int]]:
    return sorted(
        (int(a), int(b))
        for s, n in zip(starts, lengths, strict=True)
        for a, b in zip(tokens[s : s + n - 1], tokens[s + 1 : s + n], strict=True)
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 300), min_size=1, max_size=40), st.sampled_from([8, 17, 64, 129]))
def test_targets_are_exactly_the_pairs_inside_documents(lengths, row_len):
    tokens, starts, lengths = make_documents(lengths)
    rows, _ = pack_rows(tokens, starts, lengths, row_len, PAD)
    assert rows.shape[1] == row_len
    inputs, targets = loss_targets(rows, EOS, PAD)
    valid = targets != -100
    learned = sorted(zip(inputs[valid].tolist(), targets[valid].tolist(), strict=True))
    assert learned == document_pairs(tokens, starts, lengths)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 300), min_size=1, max_size=40), st.sampled_from([8, 64]))
def test_every_token_is_stored_and_the_rest_is_padding(lengths, row_len):
    tokens, starts, lengths = make_documents(lengths)
    rows, _ = pack_rows(tokens, starts, lengths, row_len, PAD)
    pieces = len(split_into_pieces(starts, lengths, row_len).starts)
    overlap = pieces - len(lengths)  # a document cut in k pieces stores k - 1 tokens twice
    assert (rows != PAD).sum() == lengths.sum() + overlap
    assert rows.shape[0] <= pieces


def test_a_long_document_is_cut_into_overlapping_pieces_in_order():
    pieces = split_into_pieces(np.array([100]), np.array([20]), row_len=8)
    assert pieces.starts.tolist() == [100, 107, 114]
    assert pieces.lengths.tolist() == [8, 8, 6]
    assert pieces.document.tolist() == [0, 0, 0] and pieces.index.tolist() == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 300), min_size=1, max_size=40), st.sampled_from([8, 17, 64]))
def test_a_long_documents_rows_read_in_order_give_its_tokens_end_to_end(lengths, row_len):
    """Each row of a document longer than a row names it and its index; reading its rows' inputs (row[:-1]) in
    index order gives the document's tokens without gap or repeat, each row starting with a piece of it."""
    tokens, starts, lengths = make_documents(lengths)
    rows, documents = pack_rows(tokens, starts, lengths, row_len, PAD)
    assert documents.shape == (len(rows), 2)
    long = np.flatnonzero(lengths > row_len)
    assert sorted(set(documents[:, 0].tolist()) - {NO_DOCUMENT}) == long.tolist()
    assert (documents[documents[:, 0] == NO_DOCUMENT, 1] == 0).all()
    for doc in long:
        mine = np.flatnonzero(documents[:, 0] == doc)
        assert documents[mine, 1].tolist() == list(range(len(mine)))  # stored in reading order
        inputs = np.concatenate([rows[r, :-1] for r in mine[:-1]] + [rows[mine[-1]]])
        text = tokens[starts[doc] : starts[doc] + lengths[doc]]
        assert inputs[: len(text)].tolist() == text.tolist()


def test_whole_documents_fill_the_room_after_a_long_documents_last_piece():
    tokens, starts, lengths = make_documents([12, 3, 3])  # rows of 8: pieces of 8 and 5 (one token shared)
    rows, documents = pack_rows(tokens, starts, lengths, 8, PAD)
    assert documents.tolist() == [[0, 0], [0, 1], [NO_DOCUMENT, 0]]
    assert (rows[1] != PAD).sum() == 5 + 3  # one 3-token document fills the room after the last piece
    assert (rows[2] != PAD).sum() == 3


def test_the_target_after_an_end_of_document_is_masked():
    rows = np.array([[5, 6, EOS, 7, 8, EOS, PAD, PAD]])
    inputs, targets = loss_targets(rows, EOS, PAD)
    assert inputs.tolist() == [[5, 6, EOS, 7, 8, EOS, PAD]]
    assert targets.tolist() == [[6, EOS, -100, 8, EOS, -100, -100]]
    assert inputs.dtype == targets.dtype == np.int64


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=200), st.integers(50, 120))
def test_best_fit_decreasing_never_overfills_or_overlaps(lengths, capacity):
    lengths = np.array(lengths)
    bins, offsets, n_bins = best_fit_decreasing(lengths, capacity)
    used = np.zeros((n_bins, capacity), dtype=int)
    for b, o, n in zip(bins, offsets, lengths, strict=True):
        used[b, o : o + n] += 1
    assert used.max() == 1
    assert (offsets + lengths <= capacity).all()
    # No bin is opened while another has room for the item, so at most one bin ends half empty or worse.
    assert ((used.sum(axis=1) <= capacity / 2).sum()) <= 1
