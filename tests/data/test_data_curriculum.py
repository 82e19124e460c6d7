"""Split by group, infill, and mixing to the short/long ratio."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.data.curriculum import DOWNSAMPLE, REPEAT, make_infill, mix, split_by_group
from cognate.data.formatting import Document

SIDES = {"a": "short", "b": "short", "c": "long", "d": "long", "infill": "short"}


def docs_for(source: str, groups: int, per_group: int = 1) -> list[Document]:
    return [
        Document(source, f"g{g}", f"{source} group {g} question {q}")
        for g in range(groups)
        for q in range(per_group)
    ]


def test_validation_holds_out_whole_groups_of_every_source():
    documents = docs_for("a", 100) + docs_for("c", 15, per_group=13)
    train, validation = split_by_group(documents, 0.1, seed=3)
    assert len(train) + len(validation) == len(documents)
    for source in ("a", "c"):
        train_groups = {d.group for d in train if d.source == source}
        held = {d.group for d in validation if d.source == source}
        assert held and not train_groups & held
    assert len({d.group for d in validation if d.source == "a"}) == 10
    assert len({d.group for d in validation if d.source == "c"}) == 2  # round(1.5); all 13 questions each
    assert sum(d.source == "c" for d in validation) == 26


def test_the_split_is_deterministic_for_a_seed_and_changes_with_it():
    documents = docs_for("a", 200)
    first = split_by_group(documents, 0.1, seed=1)[1]
    assert split_by_group(list(reversed(documents)), 0.1, seed=1)[1] == sorted(
        first, key=documents[::-1].index
    )
    assert {d.group for d in split_by_group(documents, 0.1, seed=2)[1]} != {d.group for d in first}


def test_a_source_with_one_group_trains_on_it():
    train, validation = split_by_group(docs_for("a", 1, per_group=5), 0.5, seed=0)
    assert len(train) == 5 and not validation


def test_infill_replaces_a_share_of_documents_with_fill_in_the_middle_ones():
    documents = docs_for("a", 2000)
    result = make_infill(documents, 0.1, seed=0)
    infill = [d for d in result if d.source == "infill"]
    assert len(result) == len(documents)
    assert 150 < len(infill) < 250
    for d in infill:
        prefix, suffix, middle = d.pieces()
        assert prefix + middle + suffix == d.text and middle
    assert make_infill(documents, 0.1, seed=0) == result


def random_corpus(seed: int, n: int) -> tuple[list[Document], np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = rng.choice(list("abcd"), size=n)
    documents = [Document(s, f"g{i}", "x") for i, s in enumerate(sources)]
    lengths = np.where(np.isin(sources, ["c", "d"]), rng.integers(500, 5000, n), rng.integers(20, 400, n))
    return documents, lengths


def ratio(documents, lengths, copies) -> float:
    short = np.array([SIDES[d.source] == "short" for d in documents])
    used = lengths * copies
    return used[short].sum() / used.sum()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.2, 0.8), st.sampled_from([DOWNSAMPLE, REPEAT]))
def test_mixing_reaches_the_ratio_within_one_document(seed, target, strategy):
    documents, lengths = random_corpus(seed, 600)
    result = mix(documents, lengths, SIDES, target, strategy, seed)
    # Each of the two sources on the trimmed side ends within half a document of its share.
    tolerance = lengths.max() / (lengths * result.copies).sum()
    assert abs(ratio(documents, lengths, result.copies) - target) <= tolerance
    if strategy == DOWNSAMPLE:
        assert set(result.copies.tolist()) <= {0, 1}
    else:
        assert (result.copies >= 1).all()


def test_downsampling_trims_the_largest_sources_first():
    documents = docs_for("a", 1000) + docs_for("b", 40) + docs_for("c", 100)
    lengths = np.full(len(documents), 10)
    result = mix(documents, lengths, SIDES, 0.6, DOWNSAMPLE, seed=0)
    # 1000 long-side tokens call for 1500 short ones: b keeps all its 400, a is cut from 10000 to 1100.
    assert result.source_factor["b"] == 1.0 and result.source_factor["c"] == 1.0
    assert result.source_factor["a"] == pytest.approx(0.11)


def test_repeating_records_the_factor_of_the_smaller_side():
    documents = docs_for("a", 100) + docs_for("c", 100)
    lengths = np.full(len(documents), 10)
    result = mix(documents, lengths, SIDES, 0.25, REPEAT, seed=0)
    assert result.source_factor["a"] == 1.0
    assert result.source_factor["c"] == pytest.approx(3.0)


def test_mixing_needs_both_sides():
    with pytest.raises(ValueError, match="no long-side documents"):
        mix(docs_for("a", 3), np.full(3, 5), SIDES, 0.45, DOWNSAMPLE, seed=0)
