"""Evaluation metrics as pure functions: math answers, QA exact match and F1, distinct-n, mode collapse, perplexity.

Conventions follow the datasets' own evaluation scripts where they have one: GSM8K's final answer is the
number after `####`; QA answers are normalized as in SQuAD's script (lowercase, no punctuation, no articles,
single spaces), and a yes/no answer only scores on an exact match, as in HotpotQA's and 2WikiMultiHopQA's.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from itertools import groupby

GSM8K_ANSWER_MARK = "####"
DECIMAL_TOLERANCE = Fraction(1, 10_000)  # four decimal places, for non-integer gold answers

# A number as written in a solution: optional minus and dollar sign, thousands separators, decimals.
# Digits glued to a letter, a dot or a colon are not a number of their own ("x2", "3:30"), so times and ratios
# are compared as text.
_NUMBER = re.compile(
    r"(?<![\w.:])(?P<sign>-)?(?:\$\s?)?(?P<digits>\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)?(?P<decimals>\.\d+)?(?![\d:])"
)
_UNICODE_MINUSES = str.maketrans({"\u2212": "-", "\u2013": "-"})


def _numbers(text: str) -> list[Fraction]:
    values = []
    for match in _NUMBER.finditer(text.translate(_UNICODE_MINUSES)):
        digits, decimals = match["digits"], match["decimals"]
        if digits is None and decimals is None:
            continue
        value = Fraction((digits or "0").replace(",", "") + (decimals or ""))
        values.append(-value if match["sign"] else value)
    return values


def extract_math_answer(text: str) -> Fraction | None:
    """The final numeric answer in a solution, exactly (as a Fraction), or None if there is none.

    With a `####` mark, the first number after the last mark (GSM8K's convention); without one, the last
    number in the text. Commas, `$`, `%` and units around the number are ignored: "#### $1,234.50 dollars"
    gives 1234.5.
    """
    if GSM8K_ANSWER_MARK in text:
        numbers = _numbers(text.rsplit(GSM8K_ANSWER_MARK, 1)[1])
        return numbers[0] if numbers else None
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def math_exact_match(prediction: str, gold: str) -> bool:
    """Whether a generated solution reaches the gold answer.

    Numeric gold answers (GSM8K's full solution with `####`, or a bare "18" or "5.0") match when the extracted
    numbers are equal: integers exactly (5 matches 5.0 and 1,080 matches 1080), non-integers to within
    `DECIMAL_TOLERANCE`, because SVAMP and ASDiv store answers such as 5/6 as 0.8333333333333334 (0.8333
    matches, 0.83 does not). Gold answers without a number (ASDiv has "Yes", "3:30 p.m.") match on normalized
    text against what follows the last `####` in the prediction, or the whole prediction when it has no mark.
    """
    gold_value = extract_math_answer(gold)
    if gold_value is None:
        final = prediction.rsplit(GSM8K_ANSWER_MARK, 1)[-1]
        return normalize_answer(final) == normalize_answer(gold.rsplit(GSM8K_ANSWER_MARK, 1)[-1])
    predicted = extract_math_answer(prediction)
    if predicted is None:
        return False
    if gold_value.denominator == 1:
        return predicted == gold_value
    return abs(predicted - gold_value) < DECIMAL_TOLERANCE


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_YES_NO = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def qa_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0."""
    _require_answers(gold_answers)
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in gold_answers))


def qa_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Token-level F1 between the normalized prediction and the best-matching gold answer."""
    _require_answers(gold_answers)
    return max(_token_f1(normalize_answer(prediction), normalize_answer(gold)) for gold in gold_answers)


def _token_f1(predicted: str, gold: str) -> float:
    if (predicted in _YES_NO or gold in _YES_NO) and predicted != gold:
        return 0.0
    predicted_tokens, gold_tokens = predicted.split(), gold.split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _require_answers(gold_answers: Sequence[str]) -> None:
    if isinstance(gold_answers, str) or not gold_answers:
        raise ValueError(f"gold_answers must be a non-empty list of strings, got {gold_answers!r}")


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks: "a::b" is ["a", ":", ":", "b"], so runs of symbols are visible."""
    return _TOKEN.findall(text)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in `texts` (Li et al., 2016), pooled; 0.0 when there are none."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ngrams = [tuple(tokens[i : i + n]) for tokens in map(tokenize, texts) for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


# Thresholds of `detect_collapse`. Real text stays well inside them (eight texts of 64-256 tokens, as `tokenize`
# splits them; docs/evaluation.md has the table): GSM8K solutions reach runs of one token of 4, punctuation runs
# of 6, punctuation share 0.47, distinct-1 0.16, distinct-2 0.50; MBPP's reference programs 4, 29, 0.60, 0.11, 0.44.
REPEAT_RUN_LIMIT = 8  # the same token this many times in a row ("::::::::", "the the the ...")
PUNCTUATION_RUN_LIMIT = 40  # this many punctuation marks in a row, mixed (":,:;.:" ...)
PUNCTUATION_SHARE_LIMIT = 0.9  # punctuation marks are more than this share of all tokens...
DOMINANT_TOKEN_SHARE = 0.5  # ...or one token is more than this share...
SHARE_MIN_TOKENS = 20  # ...counted only when there are at least this many tokens
MIN_DISTINCT_1 = 0.05
MIN_DISTINCT_2 = 0.2


def detect_collapse(texts: Sequence[str]) -> dict:
    """Flag mode collapse in generations on fixed prompts (one token repeated, colons, low distinct-n).

    Returns the statistics, `collapsed` (any check failed) and `reasons` (one line per failed check). The
    thresholds are the module constants above.
    """
    if not texts:
        raise ValueError("texts must hold at least one generation")
    token_lists = [tokenize(text) for text in texts]
    counts = Counter(token for tokens in token_lists for token in tokens)
    num_tokens = sum(counts.values())
    top_token, top_count = counts.most_common(1)[0] if counts else ("", 0)
    stats = {
        "num_texts": len(texts),
        "num_tokens": num_tokens,
        "empty_fraction": _share(sum(not tokens for tokens in token_lists), len(texts)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "top_token": top_token,
        "top_token_share": _share(top_count, num_tokens),
        "punctuation_share": _share(
            sum(n for token, n in counts.items() if _is_punctuation(token)), num_tokens
        ),
        "longest_repeat_run": max(map(_longest_repeat, token_lists)),
        "longest_punctuation_run": max(map(_longest_punctuation_run, token_lists)),
    }
    if num_tokens == 0:
        return {"collapsed": True, "reasons": ["every generation is empty"], **stats}
    checks = [
        (
            stats["longest_repeat_run"] >= REPEAT_RUN_LIMIT,
            f"{stats['longest_repeat_run']} times the same token in a row",
        ),
        (
            stats["longest_punctuation_run"] >= PUNCTUATION_RUN_LIMIT,
            f"a run of {stats['longest_punctuation_run']} punctuation marks",
        ),
        (
            num_tokens >= SHARE_MIN_TOKENS and stats["punctuation_share"] > PUNCTUATION_SHARE_LIMIT,
            f"punctuation is {stats['punctuation_share']:.0%} of all tokens",
        ),
        (
            num_tokens >= SHARE_MIN_TOKENS and stats["top_token_share"] > DOMINANT_TOKEN_SHARE,
            f"{top_token!r} is {stats['top_token_share']:.0%} of all tokens",
        ),
        (stats["distinct_1"] < MIN_DISTINCT_1, f"distinct-1 {stats['distinct_1']:.3f} < {MIN_DISTINCT_1}"),
        (stats["distinct_2"] < MIN_DISTINCT_2, f"distinct-2 {stats['distinct_2']:.3f} < {MIN_DISTINCT_2}"),
    ]
    reasons = [reason for failed, reason in checks if failed]
    return {"collapsed": bool(reasons), "reasons": reasons, **stats}


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _longest_repeat(tokens: list[str]) -> int:
    return max((len(list(run)) for _, run in groupby(tokens)), default=0)


def _longest_punctuation_run(tokens: list[str]) -> int:
    runs = groupby(tokens, key=_is_punctuation)
    return max((len(list(run)) for punctuation, run in runs if punctuation), default=0)


def _is_punctuation(token: str) -> bool:
    return not (token[0].isalnum() or token[0] == "_")


def perplexity_from_loss(mean_loss: float) -> float:
    """exp of the mean next-token cross-entropy in nats, averaged over tokens (not over batches of unequal size).

    Returns inf when the exponential overflows a float.
    """
    if math.isnan(mean_loss) or mean_loss < 0:
        raise ValueError(f"mean_loss must be a non-negative cross-entropy in nats, got {mean_loss}")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
