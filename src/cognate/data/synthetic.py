"""The built-in SYNTHETIC curriculum: generated from the seed, for a fresh machine with no data and no network.

Three generated tasks stand in for the real sources, in the same text layouts:
- arithmetic word problems (short), with multi-step worked solutions and computed answers;
- code edits (short): a small Python function with one injected bug, then the fixed function;
- key-value recall (long): a few hundred records, then questions about records read thousands of tokens earlier.
It is a smoke-test curriculum for checking that the pipeline trains, not a substitute for the real data.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from cognate.data import formatting as fmt
from cognate.data.formatting import Document
from cognate.data.sources import LONG, SHORT

ARITHMETIC, CODE_EDITS, RECALL = "synthetic_arithmetic", "synthetic_code_edits", "synthetic_kv_recall"
SIDES = {ARITHMETIC: SHORT, CODE_EDITS: SHORT, RECALL: LONG}
# About 4 MB of text in all, roughly 45/55 short/long in tokens before mixing.
COUNTS = {ARITHMETIC: 5000, CODE_EDITS: 2500, RECALL: 160}

_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jon",
    "Kemi",
    "Liam",
    "Mia",
]
_ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "beads",
]
_WORDS = [
    "amber",
    "birch",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "maple",
    "nectar",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "sable",
    "tundra",
    "umber",
    "violet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


def generate(seed: int) -> dict[str, list[Document]]:
    rng = random.Random(seed)
    makers: dict[str, Callable[[random.Random], str]] = {
        ARITHMETIC: arithmetic_problem,
        CODE_EDITS: code_edit,
        RECALL: recall_document,
    }
    return {
        name: [Document(name, f"{name}-{i}", make(rng)) for i in range(COUNTS[name])]
        for name, make in makers.items()
    }


# ---------------------------------------------------------------------------------------------------- arithmetic


def arithmetic_problem(rng: random.Random) -> str:
    return rng.choice((_buy_and_give, _share_packs, _two_legs, _wages))(rng)


def _buy_and_give(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(5, 90), rng.randint(2, 60)
    c = rng.randint(1, a + b)
    question = (
        f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to {friend}. "
        f"How many {item} does {name} have now?"
    )
    steps = f"After buying, {name} has {a} + {b} = {a + b} {item}.\nAfter giving, {name} has {a + b} - {c} = {a + b - c} {item}."
    return fmt.math_text(question, steps, str(a + b - c))


def _share_packs(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    per_pack = rng.choice([d for d in range(2, 13) if (friends * each) % d == 0] or [1])
    packs = friends * each // per_pack
    question = (
        f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack, and shares them equally "
        f"among {friends} friends. How many {item} does each friend get?"
    )
    total = packs * per_pack
    steps = (
        f"{name} has {packs} * {per_pack} = {total} {item}.\nEach friend gets {total} / {friends} = {each}."
    )
    return fmt.math_text(question, steps, str(each))


def _two_legs(rng: random.Random) -> str:
    s1, h1, s2, h2 = rng.randint(20, 70), rng.randint(1, 6), rng.randint(20, 70), rng.randint(1, 6)
    vehicle = rng.choice(("car", "train", "bus", "boat"))
    question = (
        f"A {vehicle} travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for {h2} "
        "hours. How many miles does it travel in total?"
    )
    d1, d2 = s1 * h1, s2 * h2
    steps = f"First part: {s1} * {h1} = {d1} miles.\nSecond part: {s2} * {h2} = {d2} miles.\nTotal: {d1} + {d2} = {d1 + d2} miles."
    return fmt.math_text(question, steps, str(d1 + d2))


def _wages(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    rate, hours, weeks = rng.randint(8, 30), rng.randint(3, 20), rng.randint(2, 6)
    earned = rate * hours * weeks
    spent = rng.randint(0, earned)
    question = (
        f"{name} earns ${rate} per hour and works {hours} hours a week. After {weeks} weeks, {name} spends "
        f"${spent}. How many dollars does {name} have left?"
    )
    steps = (
        f"Each week {name} earns {rate} * {hours} = {rate * hours} dollars.\n"
        f"In {weeks} weeks that is {rate * hours} * {weeks} = {earned} dollars.\n"
        f"Left: {earned} - {spent} = {earned - spent} dollars."
    )
    return fmt.math_text(question, steps, str(earned - spent))


# ---------------------------------------------------------------------------------------------------- code edits

# (task, correct body, buggy body): {f} is the function name, {x} the argument name.
_FUNCTIONS = (
    (
        "Return the sum of a list of numbers.",
        "def {f}({x}):\n    total = 0\n    for value in {x}:\n        total += value\n    return total",
        "def {f}({x}):\n    total = 1\n    for value in {x}:\n        total += value\n    return total",
    ),
    (
        "Return the largest number in a non-empty list.",
        "def {f}({x}):\n    best = {x}[0]\n    for value in {x}[1:]:\n        if value > best:\n            best = value\n    return best",
        "def {f}({x}):\n    best = {x}[0]\n    for value in {x}[1:]:\n        if value < best:\n            best = value\n    return best",
    ),
    (
        "Return the product of the integers from 1 to n.",
        "def {f}({x}):\n    result = 1\n    for i in range(1, {x} + 1):\n        result *= i\n    return result",
        "def {f}({x}):\n    result = 1\n    for i in range(1, {x}):\n        result *= i\n    return result",
    ),
    (
        "Return the string reversed.",
        "def {f}({x}):\n    return {x}[::-1]",
        "def {f}({x}):\n    return {x}[::1]",
    ),
    (
        "Count the even numbers in a list.",
        "def {f}({x}):\n    return sum(1 for value in {x} if value % 2 == 0)",
        "def {f}({x}):\n    return sum(1 for value in {x} if value % 2 == 1)",
    ),
    (
        "Return the average of a non-empty list of numbers.",
        "def {f}({x}):\n    return sum({x}) / len({x})",
        "def {f}({x}):\n    return sum({x}) / (len({x}) - 1)",
    ),
    (
        "Return the last element of a non-empty list.",
        "def {f}({x}):\n    return {x}[len({x}) - 1]",
        "def {f}({x}):\n    return {x}[len({x})]",
    ),
)
_FUNCTION_NAMES = ("solve", "compute", "helper", "process", "evaluate", "calc", "run_task", "answer")
_ARGUMENT_NAMES = ("values", "items", "data", "xs", "numbers", "seq", "n", "arr")


def code_edit(rng: random.Random) -> str:
    task, good, bad = rng.choice(_FUNCTIONS)
    names = {"f": rng.choice(_FUNCTION_NAMES), "x": rng.choice(_ARGUMENT_NAMES)}
    return f"Task: {task}\n" + fmt.repair_text(bad.format(**names), good.format(**names))


# ---------------------------------------------------------------------------------------------------- recall


def recall_document(rng: random.Random, records: int = 235, questions: int = 8) -> str:
    """Records `key -> value`, then questions about records from the first half, read long before."""
    keys = [f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.randint(10, 99)}" for _ in range(records)]
    keys = list(dict.fromkeys(keys))
    values = {key: str(rng.randint(1000, 9999)) for key in keys}
    lines = ["Remember these records. Questions about them follow at the end."]
    lines += [f"Record {i + 1}: the code of {key} is {values[key]}." for i, key in enumerate(keys)]
    asked = rng.sample(keys[: len(keys) // 2], min(questions, len(keys) // 2))
    blocks = ["\n".join(lines)]
    blocks += [f"Question: What is the code of {key}?\nAnswer: {values[key]}" for key in asked]
    return "\n\n".join(blocks)
