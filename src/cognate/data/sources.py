"""The curriculum's sources: where each one's files are, how its records parse, and the same data on the hub.

Every source reads its dataset's published format from a local folder laid out like `../shared/data` (see
docs/data.md), or from the Hugging Face hub through `datasets`; a hub record is first mapped back into the
published format, so both paths share one parser. A parser turns one record into an `Item` (one document) or a
`ReadingItem` (questions about an article; all questions about one article become one document).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cognate.data import formatting as fmt
from cognate.data.formatting import Document
from cognate.data.readers import (
    DataFormatError,
    FieldError,
    Location,
    RawRecord,
    ReadResult,
    SkipLog,
    read_csv_records,
    read_json_records,
    read_parallel_lines,
    read_xml_elements,
)

SHORT, LONG = "short", "long"
INFILL = "infill"


@dataclass(frozen=True)
class Item:
    key: str
    text: str


@dataclass(frozen=True)
class ReadingItem:
    heading: str
    article: str
    questions: tuple[tuple[str, str], ...]


Parsed = Item | ReadingItem | None  # None: a record left out on purpose (e.g. an evaluation split)


@dataclass(frozen=True)
class HubSpec:
    """Arguments for `datasets.load_dataset`. `path` is a hub id, or a packaged builder ("json", "parquet", "csv")
    reading `data_files` (used where the hub repository still carries a loading script, which `datasets` no longer
    runs)."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | None = None

    def describe(self) -> str:
        target = self.data_files or self.path
        return f"hub:{target}" + (f"[{self.name}]" if self.name else "") + f"[{self.split}]"


@dataclass(frozen=True)
class Source:
    name: str
    side: str
    files: tuple[str, ...]
    read: Callable[[Path], Iterator[ReadResult]]
    parse: Callable[[dict], Parsed]
    hub: tuple[HubSpec, ...]
    from_hub: Callable[[dict], dict] = lambda record: record


@dataclass
class LoadedSource:
    documents: list[Document]
    inputs: list[dict] = field(default_factory=list)
    excluded: int = 0


def text_key(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------------- fields


def _text(data: dict, name: str) -> str:
    if name not in data or data[name] is None:
        raise FieldError(name, "missing")
    value = data[name]
    if not isinstance(value, str):
        raise FieldError(name, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise FieldError(name, "empty")
    return fmt.normalize_newlines(value)


def _list(data: dict, name: str) -> list:
    if name not in data or data[name] is None:
        raise FieldError(name, "missing")
    if not isinstance(data[name], list):
        raise FieldError(name, f"expected a list, got {type(data[name]).__name__}")
    return data[name]


def _texts(data: dict, name: str) -> list[str]:
    values = _list(data, name)
    if not all(isinstance(v, str) for v in values):
        raise FieldError(name, "expected a list of text")
    return [fmt.normalize_newlines(v) for v in values]


# ---------------------------------------------------------------------------------------------------- math


def parse_gsm8k(data: dict) -> Item:
    question, answer = _text(data, "question"), _text(data, "answer")
    if fmt.ANSWER_MARK not in answer:
        raise FieldError("answer", f"no '{fmt.ANSWER_MARK} <final answer>' line")
    steps, final = answer.rsplit(fmt.ANSWER_MARK, 1)
    if not final.strip():
        raise FieldError("answer", f"nothing after '{fmt.ANSWER_MARK}'")
    text = fmt.math_text(question, fmt.strip_calculator_annotations(steps), final)
    return Item(text_key(question), text)


_OPERATORS = {"+": 1, "-": 1, "*": 2, "/": 2}


def parse_svamp(data: dict) -> Item:
    """A row of the SVAMP paper's MAWPS+ASDiv-A training CSV: `numberN` placeholders, a prefix equation."""
    question = _text(data, "Question")
    try:
        numbers = [float(v) for v in _text(data, "Numbers").split()]
    except ValueError:
        raise FieldError("Numbers", "expected numbers separated by spaces") from None

    def number(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(numbers):
            raise FieldError("Question", f"mentions number{index} but Numbers has {len(numbers)} values")
        return fmt.format_number(numbers[index])

    equation = _text(data, "Equation")
    try:
        answer = fmt.format_number(float(_text(data, "Answer")))
    except ValueError:
        raise FieldError("Answer", "expected a number") from None
    tokens = [re.sub(r"number(\d+)", number, token) for token in equation.split()]
    infix, rest = _prefix_to_infix(tokens)
    if rest:
        raise FieldError("Equation", f"not a prefix expression: {equation!r}")
    text = fmt.math_text(re.sub(r"number(\d+)", number, question), f"{infix} = {answer}", answer)
    return Item(text_key(question, data.get("Numbers", "")), text)


def _prefix_to_infix(tokens: list[str]) -> tuple[str, list[str]]:
    """`['*', '2', '-', '5', '3']` -> `'2 * (5 - 3)'`, parenthesized only where precedence needs it."""
    if not tokens:
        raise FieldError("Equation", "ends early")
    head, rest = tokens[0], tokens[1:]
    if head not in _OPERATORS:
        try:
            float(head)
        except ValueError:
            raise FieldError("Equation", f"unknown token {head!r}") from None
        return head, rest
    left, rest = _prefix_to_infix(rest)
    right, rest = _prefix_to_infix(rest)
    if _precedence(tokens[1:]) < _OPERATORS[head]:
        left = f"({left})"
    right_first = tokens[1 + _span(tokens[1:])]
    right_precedence = _OPERATORS.get(right_first, 3)
    if right_precedence < _OPERATORS[head] or (right_precedence == _OPERATORS[head] and head in "-/"):
        right = f"({right})"
    return f"{left} {head} {right}", rest


def _precedence(tokens: list[str]) -> int:
    return _OPERATORS.get(tokens[0], 3)


def _span(tokens: list[str]) -> int:
    """How many tokens the prefix expression at the start of `tokens` takes."""
    needed, used = 1, 0
    while needed:
        needed += 1 if tokens[used] in _OPERATORS else -1
        used += 1
    return used


_UNIT = re.compile(r"^(.*?)\s*\(([^()]*)\)\s*$")


def parse_asdiv(data: dict) -> Item:
    """An ASDiv `<Problem>`: Body, Question, Answer like `9 (apples)`, Formula like `7+2=9`."""
    body, question, answer = _text(data, "Body"), _text(data, "Question"), _text(data, "Answer")
    unit = _UNIT.match(answer.strip())
    if unit and unit.group(1):
        answer = unit.group(1)
    formula = _text(data, "Formula") if data.get("Formula") else ""
    text = fmt.math_text(f"{body.strip()} {question.strip()}", formula, answer)
    return Item(str(data.get("ID") or text_key(body, question)), text)


def asdiv_from_hub(record: dict) -> dict:
    return {
        "Body": record.get("body"),
        "Question": record.get("question"),
        "Answer": record.get("answer"),
        "Formula": record.get("formula"),
    }


# ---------------------------------------------------------------------------------------------------- code

# MBPP's README: task ids 11-510 are the test split, which evaluation (pass@1) uses; training never sees them.
MBPP_TEST_IDS = range(11, 511)


def parse_mbpp(data: dict) -> Item | None:
    task_id = data.get("task_id")
    if not isinstance(task_id, int):
        raise FieldError("task_id", "missing" if task_id is None else "expected an integer")
    if task_id in MBPP_TEST_IDS:
        return None
    text = fmt.code_text(_text(data, "text"), _texts(data, "test_list"), _text(data, "code"))
    return Item(str(task_id), text)


def parse_codexglue(data: dict) -> Item:
    buggy, fixed = _text(data, "buggy"), _text(data, "fixed")
    return Item(text_key(buggy, fixed), fmt.repair_text(buggy, fixed))


def _read_codexglue(folder: Path) -> Iterator[ReadResult]:
    for size in ("small", "medium"):
        for split in ("valid", "test"):
            stem = f"{size}/{split}.buggy-fixed"
            paths = {kind: folder / f"{stem}.{kind}" for kind in ("buggy", "fixed")}
            yield from read_parallel_lines(
                paths, {kind: f"codexglue_code_refinement/{stem}.{kind}" for kind in paths}
            )


# ---------------------------------------------------------------------------------------------------- multi-hop QA


def parse_hotpotqa(data: dict) -> Item:
    """HotpotQA, either in its original format or in IRCoT's processed one (`question_text`, `contexts`)."""
    if "contexts" in data or "question_text" in data:
        question = _text(data, "question_text")
        answers = _list(data, "answers_objects")
        spans = answers[0].get("spans") if answers and isinstance(answers[0], dict) else None
        if not isinstance(spans, list) or not spans or not isinstance(spans[0], str):
            raise FieldError("answers_objects", "no answer span")
        paragraphs = [_paragraph(p, "contexts", "title", "paragraph_text") for p in _list(data, "contexts")]
        key = data.get("question_id") or text_key(question)
        return Item(str(key), fmt.context_qa_text(paragraphs, question, spans[0]))
    question, answer = _text(data, "question"), _text(data, "answer")
    paragraphs = _titled_sentences(_list(data, "context"))
    return Item(str(data.get("_id") or text_key(question)), fmt.context_qa_text(paragraphs, question, answer))


def hotpotqa_from_hub(record: dict) -> dict:
    return {**record, "_id": record.get("id"), "context": _columns_to_pairs(record.get("context"))}


def parse_2wikimultihopqa(data: dict) -> Item:
    """2WikiMultiHopQA: ten titled paragraphs; a record without them (as in part of the MIGRES copy) falls back
    on its evidence triples, which state the facts the question needs."""
    question, answer = _text(data, "question"), _text(data, "answer")
    if data.get("context") is not None:
        paragraphs = _titled_sentences(_list(data, "context"))
    elif data.get("evidences"):
        triples = _list(data, "evidences")
        if not all(isinstance(t, list) and len(t) == 3 for t in triples):
            raise FieldError("evidences", "expected [subject, relation, object] triples")
        paragraphs = [("Facts", "\n".join(f"{s} | {r} | {o}" for s, r, o in triples))]
    else:
        raise FieldError("context", "missing, and no 'evidences' to stand in for it")
    key = data.get("_id") or text_key(question)
    return Item(str(key), fmt.context_qa_text(paragraphs, question, answer))


def twowiki_from_hub(record: dict) -> dict:
    return {
        **record,
        "_id": record.get("_id") or record.get("id"),
        "context": _columns_to_pairs(record.get("context")),
    }


def parse_musique(data: dict) -> Item:
    question, answer = _text(data, "question"), _text(data, "answer")
    paragraphs = [_paragraph(p, "paragraphs", "title", "paragraph_text") for p in _list(data, "paragraphs")]
    return Item(str(data.get("id") or text_key(question)), fmt.context_qa_text(paragraphs, question, answer))


def _paragraph(value: object, field_name: str, title: str, text: str) -> tuple[str, str]:
    if not isinstance(value, dict) or not isinstance(value.get(text), str):
        raise FieldError(field_name, f"each paragraph needs '{title}' and '{text}'")
    return str(value.get(title) or ""), value[text]


def _titled_sentences(context: list) -> list[tuple[str, str]]:
    """The original HotpotQA/2Wiki `context`: a list of [title, [sentence, ...]]."""
    paragraphs = []
    for entry in context:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise FieldError("context", "expected [title, [sentences]] pairs")
        paragraphs.append((str(entry[0]), " ".join(str(s).strip() for s in entry[1])))
    return paragraphs


def _columns_to_pairs(context: object) -> object:
    """Hub copies store `context` column-wise: {"title": [...], "sentences": [[...], ...]} (or "content")."""
    if not isinstance(context, dict):
        return context
    sentences = context.get("sentences", context.get("content"))
    if not isinstance(context.get("title"), list) or not isinstance(sentences, list):
        return context
    return [[title, list(lines)] for title, lines in zip(context["title"], sentences, strict=False)]


# ---------------------------------------------------------------------------------------------------- long documents


def _parse_leval(heading: str) -> Callable[[dict], ReadingItem]:
    """An L-Eval record: one long `input` and parallel lists of questions (`instructions`) and `outputs`."""

    def parse(data: dict) -> ReadingItem:
        article = _text(data, "input")
        questions, answers = _texts(data, "instructions"), _texts(data, "outputs")
        if len(questions) != len(answers):
            raise FieldError("outputs", f"{len(answers)} answers for {len(questions)} instructions")
        if not questions:
            raise FieldError("instructions", "empty")
        return ReadingItem(heading, article, tuple(zip(questions, answers, strict=True)))

    return parse


def parse_narrativeqa(data: dict) -> ReadingItem:
    """The summary-based NarrativeQA sample: `passage` (a story summary), `question`, `answer` (two references)."""
    passage = fmt.repair_mojibake(_text(data, "passage"))
    answers = _texts(data, "answer")
    if not answers:
        raise FieldError("answer", "empty")
    question = fmt.repair_mojibake(_text(data, "question"))
    return ReadingItem("Story summary", passage, ((question, fmt.repair_mojibake(answers[0])),))


def narrativeqa_from_hub(record: dict) -> dict:
    document, question = record.get("document") or {}, record.get("question") or {}
    return {
        "passage": (document.get("summary") or {}).get("text"),
        "question": question.get("text"),
        "answer": [a.get("text") for a in record.get("answers") or []],
    }


def svamp_from_hub(record: dict) -> dict:
    # The csv builder types the columns (Answer becomes a float); the parser reads them as the CSV text they were.
    return {key: None if value is None else str(value) for key, value in record.items()}


# ---------------------------------------------------------------------------------------------------- the registry


def _json_files(*paths: str) -> Callable[[Path], Iterator[ReadResult]]:
    def read(folder: Path) -> Iterator[ReadResult]:
        for path in paths:
            yield from read_json_records(folder / path, path)

    return read


def _source(
    name: str, side: str, files: tuple[str, ...], parse, hub: tuple[HubSpec, ...], **kwargs
) -> Source:
    """A source whose files are all JSON (Lines) unless `read` says otherwise."""
    kwargs.setdefault("read", _json_files(*files))
    return Source(name, side, files, parse=parse, hub=hub, **kwargs)


_SVAMP_CSV = "svamp/mawps-asdiv-a_svamp/train.csv"
_SVAMP_URL = "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/data/mawps-asdiv-a_svamp/train.csv"
_CODEXGLUE = tuple(
    f"codexglue_code_refinement/{size}/{split}.buggy-fixed.{kind}"
    for size in ("small", "medium")
    for split in ("valid", "test")
    for kind in ("buggy", "fixed")
)
_HOTPOTQA = ("hotpotqa/ircot_processed/dev_subsampled.jsonl", "hotpotqa/migres/hotpot.json")
_LEVAL = "hf://datasets/L4NLP/LEval@refs%2Fconvert%2Fparquet"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        _source("gsm8k", SHORT, ("gsm8k/train.jsonl",), parse_gsm8k, (HubSpec("openai/gsm8k", "main"),)),
        _source(
            "svamp",
            SHORT,
            (_SVAMP_CSV,),
            parse_svamp,
            # No hub dataset holds this split (the hub's "SVAMP" copies are the evaluation set): the paper's file.
            (HubSpec("csv", data_files=_SVAMP_URL),),
            read=lambda folder: read_csv_records(
                folder / _SVAMP_CSV, _SVAMP_CSV, ("Question", "Numbers", "Equation", "Answer")
            ),
            from_hub=svamp_from_hub,
        ),
        _source(
            "asdiv",
            SHORT,
            ("asdiv/ASDiv.xml",),
            parse_asdiv,
            (HubSpec("EleutherAI/asdiv", split="validation"),),
            read=lambda folder: read_xml_elements(folder / "asdiv/ASDiv.xml", "asdiv/ASDiv.xml", "Problem"),
            from_hub=asdiv_from_hub,
        ),
        _source(
            "mbpp",
            SHORT,
            ("mbpp/mbpp.jsonl",),
            parse_mbpp,
            (HubSpec("google-research-datasets/mbpp", "full", "train+validation+prompt"),),
        ),
        _source(
            "codexglue_refinement",
            SHORT,
            _CODEXGLUE,
            parse_codexglue,
            tuple(
                HubSpec("google/code_x_glue_cc_code_refinement", size, "validation+test")
                for size in ("small", "medium")
            ),
            read=lambda folder: _read_codexglue(folder / "codexglue_code_refinement"),
        ),
        _source(
            "hotpotqa",
            LONG,
            _HOTPOTQA,
            parse_hotpotqa,
            (HubSpec("hotpotqa/hotpot_qa", "distractor", "validation"),),
            from_hub=hotpotqa_from_hub,
        ),
        _source(
            "2wikimultihopqa",
            LONG,
            ("2wikimultihopqa/wikihop.json",),
            parse_2wikimultihopqa,
            (HubSpec("parquet", data_files="hf://datasets/xanhho/2WikiMultihopQA/dev.parquet"),),
            from_hub=twowiki_from_hub,
        ),
        _source(
            "musique",
            LONG,
            ("musique/musique.json",),
            parse_musique,
            (HubSpec("json", data_files="hf://datasets/bdsaglam/musique/musique_ans_v1.0_dev.jsonl"),),
        ),
        _source(
            "quality",
            LONG,
            ("quality/quality.jsonl",),
            _parse_leval("Article"),
            (HubSpec("parquet", data_files=f"{_LEVAL}/quality/test/*.parquet"),),
        ),
        _source(
            "qasper",
            LONG,
            ("qasper/scientific_qa.jsonl",),
            _parse_leval("Paper"),
            (HubSpec("parquet", data_files=f"{_LEVAL}/scientific_qa/test/*.parquet"),),
        ),
        _source(
            "narrativeqa",
            LONG,
            ("narrativeqa/test-tiny.jsonl",),
            parse_narrativeqa,
            (HubSpec("deepmind/narrativeqa", split="test"),),
            from_hub=narrativeqa_from_hub,
        ),
    )
}

# "infill" has no files: it is made from the other short sources' training documents (see curriculum.py).
SOURCE_ORDER = (*list(SOURCES)[:5], INFILL, *list(SOURCES)[5:])
SIDES = {**{name: s.side for name, s in SOURCES.items()}, INFILL: SHORT}


# ---------------------------------------------------------------------------------------------------- loading


def missing_files(source: Source, folder: Path) -> list[str]:
    return [path for path in source.files if not (folder / path).is_file()]


def load_local(source: Source, folder: Path, skips: SkipLog | None) -> LoadedSource:
    """Read a source's files from `folder`. Bad records raise `DataFormatError`, or are counted in `skips`."""
    records = _guard_file_errors(source, source.read(folder), skips)
    loaded = _assemble(source, records, skips)
    loaded.inputs = [_file_entry(folder, path) for path in source.files]
    return loaded


def load_hub(source: Source, skips: SkipLog | None) -> LoadedSource:
    """The same source from the Hugging Face hub (needs network), mapped back into the published format."""
    import datasets

    def records() -> Iterator[ReadResult]:
        for spec in source.hub:
            rows = datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
            for index, row in enumerate(rows, start=1):
                yield RawRecord(Location(spec.describe(), index), source.from_hub(row))

    loaded = _assemble(source, records(), skips)
    loaded.inputs = [{"path": spec.describe()} for spec in source.hub]
    return loaded


def _guard_file_errors(source: Source, results: Iterator[ReadResult], skips: SkipLog | None):
    """A file-level error ends the source's records; with skipping on, it is counted and the rest still loads."""
    try:
        yield from results
    except DataFormatError as error:
        if skips is None:
            raise
        skips.add_file(source.name, error)


def _assemble(source: Source, results, skips: SkipLog | None) -> LoadedSource:
    items: dict[str, Item] = {}
    readings: dict[str, list[ReadingItem]] = {}
    excluded = 0
    for result in results:
        try:
            parsed = _parse(source, result)
        except DataFormatError as error:
            if skips is None:
                raise
            skips.add(source.name, error)
            continue
        if parsed is None:
            excluded += 1
        elif isinstance(parsed, ReadingItem):
            readings.setdefault(text_key(parsed.article), []).append(parsed)
        else:
            items.setdefault(parsed.key, parsed)  # the same record in two files (HotpotQA) counts once
    documents = [Document(source.name, key, item.text) for key, item in items.items()]
    for key, group in readings.items():
        # Questions about one article (QuALITY, Qasper, NarrativeQA) share one document: the article once, then
        # every question, so the split holds out by article and no article is repeated.
        questions = tuple(dict.fromkeys(q for item in group for q in item.questions))
        text = fmt.reading_text(group[0].heading, group[0].article, questions)
        documents.append(Document(source.name, key, text))
    return LoadedSource(documents, excluded=excluded)


def _parse(source: Source, result: ReadResult) -> Parsed:
    if isinstance(result, DataFormatError):
        raise result
    try:
        return source.parse(result.data)
    except FieldError as error:
        raise DataFormatError(result.location, error.message, error.field) from None
    except RecursionError:  # e.g. an equation thousands of operators deep
        raise DataFormatError(result.location, "nested too deeply to read") from None


def _file_entry(folder: Path, path: str) -> dict:
    data = (folder / path).read_bytes()
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
