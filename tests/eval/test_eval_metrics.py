import csv
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cognate.eval.metrics import (
    REPEAT_RUN_LIMIT,
    detect_collapse,
    distinct_n,
    extract_math_answer,
    math_exact_match,
    normalize_answer,
    perplexity_from_loss,
    qa_exact_match,
    qa_f1,
    tokenize,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
        ("#### 1,080", 1080),
        ("so the total is\n####   $2,250.50 dollars", Fraction("2250.5")),
        ("#### -12", -12),
        ("It costs $5 and she has 3 left, so 15%", 15),  # no mark: the last number
        ("The answer is 42.", 42),
        ("she paid $1,080, then left", 1080),
        ("1,000,000 people", 1_000_000),
        ("a half is .5", Fraction(1, 2)),
        ("10 - 4", 4),  # a spaced minus is an operator, not a sign
        ("\u22127 degrees", -7),
        ("#### 18 eggs\nextra text 99", 18),  # the first number after the mark, not the last one in the text
        ("variables x2 and y3 and 3rd place", 3),
    ],
)
def test_extract_math_answer(text, answer):
    assert extract_math_answer(text) == answer


@pytest.mark.parametrize("text", ["no numbers here", "#### none given", "at 3:30 p.m.", ""])
def test_extract_math_answer_finds_nothing(text):
    assert extract_math_answer(text) is None


@given(
    value=st.integers(-(10**12), 10**12),
    template=st.sampled_from(["#### {}", "So she has {} apples.", "#### ${} total", "The answer is {}%."]),
    commas=st.booleans(),
)
def test_extract_math_answer_recovers_any_integer(value, template, commas):
    written = f"{value:,}" if commas else str(value)
    if "$" in template and value < 0:
        template, written = template.replace("$", ""), f"-${written[1:]}"
    assert extract_math_answer(template.format(written)) == value


@given(st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_extract_math_answer_is_exact_for_decimals(value):
    assert extract_math_answer(f"#### {value:f}") == Fraction(value)


def test_math_exact_match():
    assert math_exact_match("... so 5 + 13 = 18\n#### 18", "He makes 9 * 2 = <<9*2=18>>18\n#### 18")
    assert math_exact_match("#### 5", "5.0")  # SVAMP writes answers as floats
    assert math_exact_match("#### 1080", "#### 1,080")
    assert not math_exact_match("#### 17", "#### 18")
    assert not math_exact_match("I do not know", "18")
    assert math_exact_match("#### 0.8333", "0.8333333333333334")  # 5/6, as SVAMP stores it
    assert not math_exact_match("#### 0.83", "0.8333333333333334")
    assert not math_exact_match("#### 1000001", "1000000")  # integers match exactly
    assert math_exact_match("#### Yes.", "Yes")  # ASDiv has answers without a number
    assert not math_exact_match("#### No", "Yes")


@needs_shared_data
def test_every_gsm8k_answer_and_svamp_answer_is_extracted():
    gsm8k = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    for row in gsm8k:
        assert extract_math_answer(row["answer"]) == int(row["answer"].split("####")[-1].replace(",", ""))
    with (SHARED_DATA / "svamp" / "mawps-asdiv-a_svamp" / "train.csv").open() as file:
        for row in csv.DictReader(file):
            assert math_exact_match(f"#### {float(row['Answer']):.4f}", row["Answer"])


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"


def test_qa_exact_match_and_f1():
    assert qa_exact_match("the Eiffel Tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert qa_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert qa_f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)  # precision 1, recall 2/3
    assert qa_f1("cat", ["dog", "cat sat"]) == pytest.approx(2 / 3)  # the best gold answer counts
    assert qa_f1("blue", ["red"]) == 0.0


def test_yes_no_answers_score_only_when_exact():
    assert qa_f1("yes it is", ["yes"]) == 0.0
    assert qa_f1("no", ["no way"]) == 0.0
    assert qa_f1("Yes.", ["yes"]) == 1.0


def test_gold_answers_must_be_a_list():
    with pytest.raises(ValueError, match="gold_answers"):
        qa_f1("Paris", "Paris")
    with pytest.raises(ValueError, match="gold_answers"):
        qa_exact_match("Paris", [])


@given(prediction=st.text(max_size=40), gold=st.text(max_size=40))
def test_qa_metric_properties(prediction, gold):
    f1 = qa_f1(prediction, [gold])
    assert 0.0 <= f1 <= 1.0
    assert f1 == pytest.approx(qa_f1(gold, [prediction]))
    assert qa_f1(gold, [gold]) == 1.0 and qa_exact_match(gold, [gold]) == 1.0
    if qa_exact_match(prediction, [gold]):
        assert f1 == 1.0


def test_tokenize_splits_punctuation_marks():
    assert tokenize("x = f(a)::") == ["x", "=", "f", "(", "a", ")", ":", ":"]


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == 0.5  # pooled over texts
    assert distinct_n(["", "a"], 2) == 0.0
    with pytest.raises(ValueError, match="n must"):
        distinct_n(["a"], 0)


@given(st.lists(st.text(max_size=60), min_size=1, max_size=5), st.integers(1, 3))
def test_distinct_n_is_a_fraction(texts, n):
    assert 0.0 <= distinct_n(texts, n) <= 1.0


VARIED = [
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day, so she makes 9 * 2 = $18 every day at the market.",
    "def add(a, b):\n    return a + b",
    "The Eiffel Tower is in Paris, which is the capital of France.",
    "It takes 2 / 2 = 1 bolt of white fiber, so 2 + 1 = 3 bolts in total.",
]


def test_varied_generations_are_not_collapsed():
    report = detect_collapse(VARIED)
    assert not report["collapsed"], report["reasons"]


@pytest.mark.parametrize(
    ("texts", "reason"),
    [
        (["Answer: " + ": " * 40] * 4, "same token in a row"),
        (["Answer " + ":" * 40] * 4, "same token in a row"),
        ([":,;." * 15 + " ok", *VARIED], "punctuation marks"),
        ([" ".join(f"{letter} : :" for letter in "abcdefghijklmnopqrst")] * 3, "':' is"),
        (["The answer is 5. " * 20] * 8, "distinct-2"),
        ([VARIED[0]] * 8, "distinct-2"),  # the same answer whatever the prompt
        (["", ""], "empty"),
    ],
)
def test_collapsed_generations_are_flagged(texts, reason):
    report = detect_collapse(texts)
    assert report["collapsed"]
    assert any(reason in line for line in report["reasons"]), report["reasons"]


def test_repeat_threshold_is_inclusive():
    words = " ".join(f"w{i}" for i in range(30))
    just_below = detect_collapse([f"{words} {'again ' * (REPEAT_RUN_LIMIT - 1)}"])
    at_limit = detect_collapse([f"{words} {'again ' * REPEAT_RUN_LIMIT}"])
    assert not just_below["collapsed"] and at_limit["collapsed"]


def test_collapse_needs_generations():
    with pytest.raises(ValueError, match="texts"):
        detect_collapse([])


@needs_shared_data
def test_real_solutions_and_programs_are_far_from_the_collapse_thresholds():
    rng = random.Random(0)
    gsm8k = [json.loads(line)["answer"] for line in (SHARED_DATA / "gsm8k" / "train.jsonl").open()]
    mbpp = [json.loads(line)["code"] for line in (SHARED_DATA / "mbpp" / "mbpp.jsonl").open()]
    for corpus in (gsm8k, mbpp):
        for _ in range(50):
            report = detect_collapse([" ".join(tokenize(text)[:256]) for text in rng.sample(corpus, 8)])
            assert not report["collapsed"], report["reasons"]


def test_perplexity_from_loss():
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity_from_loss(1e6) == math.inf
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="mean_loss"):
            perplexity_from_loss(bad)
