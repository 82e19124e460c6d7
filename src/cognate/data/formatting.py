"""Training text, one layout per task type, and the `Document` every source produces.

The layouts are plain text a reader can follow and an evaluator can parse back:

- math:     `Problem: ...` / `Solution:` / worked steps / `#### <final answer>` (GSM8K's answer mark, for every
            math source, so exact-match evaluation reads the number after `####`)
- code:     `Task: ...` / `Tests:` / asserts / `Code:` / the solution
- repair:   `Buggy code:` / ... / `Fixed code:` / ...
- context:  titled paragraphs, then `Question: ...` / `Answer: ...`
- reading:  the whole article, then each `Question: ...` (with its options) / `Answer: ...`

Long-horizon layouts keep the full context before the questions, so answering needs what was read earlier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Document:
    """One training document. `group` is the held-out unit: documents sharing it land in the same split.

    `fim_span` (character offsets of a middle span) marks a fill-in-the-middle document: it is encoded as
    <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle, each piece tokenized on its own.
    """

    source: str
    group: str
    text: str
    fim_span: tuple[int, int] | None = None

    def pieces(self) -> tuple[str, ...]:
        if self.fim_span is None:
            return (self.text,)
        start, end = self.fim_span
        return self.text[:start], self.text[end:], self.text[start:end]


def math_text(question: str, steps: str, answer: str) -> str:
    lines = [f"Problem: {question.strip()}", "Solution:"]
    if steps.strip():
        lines.append(steps.strip())
    lines.append(f"{ANSWER_MARK} {answer.strip()}")
    return "\n".join(lines)


def code_text(task: str, tests: Sequence[str], code: str) -> str:
    return "\n".join([f"Task: {task.strip()}", "Tests:", *(t.strip() for t in tests), "Code:", code.rstrip()])


def repair_text(buggy: str, fixed: str) -> str:
    return f"Buggy code:\n{buggy.strip()}\nFixed code:\n{fixed.strip()}"


def context_qa_text(paragraphs: Sequence[tuple[str, str]], question: str, answer: str) -> str:
    blocks = [f"Paragraph: {title.strip()}\n{body.strip()}" for title, body in paragraphs]
    blocks.append(f"Question: {question.strip()}\nAnswer: {answer.strip()}")
    return "\n\n".join(blocks)


def reading_text(heading: str, article: str, questions: Sequence[tuple[str, str]]) -> str:
    blocks = [f"{heading}:\n{article.strip()}"]
    blocks += [f"Question: {tidy_lines(q)}\nAnswer: {a.strip()}" for q, a in questions]
    return "\n\n".join(blocks)


def tidy_lines(text: str) -> str:
    """Trailing spaces off every line and no blank-line runs: the L-Eval questions pad their options with both."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(solution: str) -> str:
    """GSM8K marks each calculation for a calculator tool (`48/2 = <<48/2=24>>24`); the text reads without them."""
    return _CALCULATOR_ANNOTATION.sub("", solution)


_C1_CONTROLS = re.compile("[\x80-\x9f]")


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 that was decoded as Latin-1 (`Phoebeâ\\x80\\x99s` -> `Phoebe's`), as in the NarrativeQA sample.

    C1 control characters never occur in real text but always do in this kind of mojibake (the UTF-8 lead byte
    of a curly quote or dash is followed by a 0x80-0x9f byte); text without them is returned unchanged.
    """
    if not _C1_CONTROLS.search(text):
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def format_number(value: float) -> str:
    """`504.0` -> `504`, `2.5` -> `2.5`: CSV sources store every number as a float."""
    if value == int(value):
        return str(int(value))
    return f"{value:.6g}"
