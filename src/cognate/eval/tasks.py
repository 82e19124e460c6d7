"""Held-out evaluation examples: prompts in the training layouts, with gold answers or tests.

Every example comes from data that no training run saw:
- math (GSM8K, SVAMP, ASDiv) and multi-hop QA (HotpotQA, 2WikiMultiHopQA, MuSiQue): the validation documents
  of each source, chosen by the data pipeline's own rule (`curriculum.split_by_group`, with the seed and
  validation fraction the data was prepared with), parsed back into the prompt a model continues and the gold
  answer after it;
- MBPP: task ids 11-510, MBPP's test split, which the loader leaves out of training;
- the built-in SYNTHETIC arithmetic problems: generated with `SYNTHETIC_EVAL_SEED` and checked against the
  built-in curriculum of the training seed, so none of them is a training problem.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cognate.data import curriculum, synthetic
from cognate.data import formatting as fmt
from cognate.data.formatting import Document
from cognate.data.readers import DataFormatError, SkipLog
from cognate.data.sources import MBPP_TEST_IDS, SOURCES, load_local, missing_files

MATH_SOURCES = ("gsm8k", "svamp", "asdiv")
QA_SOURCES = ("hotpotqa", "2wikimultihopqa", "musique")
PROBLEM_HEADER = "Problem: "
SOLUTION_HEADER = "\nSolution:\n"
QUESTION_HEADER = "Question: "
ANSWER_HEADER = "\nAnswer:"
SYNTHETIC_EVAL_SEED = 7_919_000  # distinct from any seed `cognate data prepare` is likely to be given
# `cognate data prepare`'s defaults, which decide the held-out split when the prepared folder is not known.
DEFAULT_SPLIT_SEED = 0
DEFAULT_VALIDATION_FRACTION = 0.05


class SourceUnavailable(Exception):
    """A source that cannot be evaluated here (its files are missing); the message says why."""


@dataclass(frozen=True)
class Example:
    """One prompt to continue. `question`: the problem or question alone, for reports. `answers`: the gold
    answers (math: the final answer; QA: the references). MBPP examples have no answers but `tests` (the
    asserts) and `test_setup` (code run before them)."""

    source: str
    id: str
    prompt: str
    question: str
    answers: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    test_setup: str = ""


@dataclass(frozen=True)
class HeldOutSplit:
    """How the data pipeline chose its validation documents: `origin` says where these values came from."""

    seed: int = DEFAULT_SPLIT_SEED
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    origin: str = "the defaults of `cognate data prepare`"

    @classmethod
    def from_manifest(cls, manifest: dict) -> HeldOutSplit:
        """The split of a folder prepared from real sources; a synthetic folder says nothing about them."""
        config = manifest.get("config", {})
        if manifest.get("synthetic") or config.get("source_dir") is None:
            return cls()
        return cls(
            int(config["seed"]), float(config["validation_fraction"]), "the prepared folder's manifest"
        )

    def to_json(self) -> dict:
        return {"seed": self.seed, "validation_fraction": self.validation_fraction, "origin": self.origin}


def held_out_documents(name: str, source_dir: Path, split: HeldOutSplit, skips: SkipLog) -> list[Document]:
    """The validation documents of one source, as `cognate data prepare` holds them out (bad records skipped)."""
    source = SOURCES[name]
    if absent := missing_files(source, source_dir):
        raise SourceUnavailable(f"missing {', '.join(absent)} in {source_dir}")
    documents = load_local(source, source_dir, skips).documents
    # The split is per source (a hash of seed, source and group), so one source alone splits as in the mix.
    return curriculum.split_by_group(documents, split.validation_fraction, split.seed)[1]


def math_example(document: Document) -> Example:
    """`Problem: ...\\nSolution:\\n` is the prompt; the gold answer is what follows the last `####`."""
    head, header, solution = document.text.partition(SOLUTION_HEADER)
    if not header or fmt.ANSWER_MARK not in solution:
        raise ValueError(f"{document.source} document {document.group} is not in the math layout")
    answer = solution.rsplit(fmt.ANSWER_MARK, 1)[1].strip()
    question = head.removeprefix(PROBLEM_HEADER)
    return Example(document.source, document.group, head + header, question, answers=(answer,))


def qa_example(document: Document) -> Example:
    """Everything up to the last `\\nAnswer:` is the prompt (paragraphs and question); the rest is the answer."""
    head, header, answer = document.text.rpartition(ANSWER_HEADER)
    if not header or not answer.strip():
        raise ValueError(f"{document.source} document {document.group} is not in the question-answer layout")
    question = head.rpartition(QUESTION_HEADER)[2]
    return Example(document.source, document.group, head + header, question, answers=(answer.strip(),))


def math_examples(
    name: str, source_dir: Path, split: HeldOutSplit, limit: int, skips: SkipLog
) -> list[Example]:
    return [math_example(d) for d in held_out_documents(name, source_dir, split, skips)[:limit]]


def qa_examples(
    name: str, source_dir: Path, split: HeldOutSplit, limit: int, skips: SkipLog
) -> list[Example]:
    return [qa_example(d) for d in held_out_documents(name, source_dir, split, skips)[:limit]]


def mbpp_examples(source_dir: Path, limit: int, skips: SkipLog) -> list[Example]:
    """The first `limit` tasks of MBPP's test split (ids 11-510), prompted in the training layout
    (`Task:` / `Tests:` / asserts / `Code:`), the way MBPP itself is prompted: description and tests."""
    source = SOURCES["mbpp"]
    if absent := missing_files(source, source_dir):
        raise SourceUnavailable(f"missing {', '.join(absent)} in {source_dir}")
    examples = []
    for record in source.read(source_dir):
        if isinstance(record, DataFormatError):
            skips.add(source.name, record)
            continue
        data = record.data
        if data.get("task_id") not in MBPP_TEST_IDS:
            continue
        text, tests, setup = data.get("text"), data.get("test_list"), data.get("test_setup_code") or ""
        if not isinstance(text, str) or not isinstance(tests, list) or not isinstance(setup, str):
            skips.add(
                source.name, DataFormatError(record.location, "needs text, test_list and test_setup_code")
            )
            continue
        tests = tuple(fmt.normalize_newlines(t) for t in tests)
        prompt = fmt.code_text(fmt.normalize_newlines(text), tests, "")  # ends with "Code:\n"
        examples.append(Example("mbpp", str(data["task_id"]), prompt, text, tests=tests, test_setup=setup))
    return sorted(examples, key=lambda e: int(e.id))[:limit]


def synthetic_math_examples(limit: int, training_seed: int = DEFAULT_SPLIT_SEED) -> list[Example]:
    """`limit` built-in arithmetic problems that are not in the built-in curriculum made with `training_seed`."""
    return [math_example(d) for d in synthetic_math_documents(limit, training_seed)]


def synthetic_math_documents(limit: int, training_seed: int = DEFAULT_SPLIT_SEED) -> list[Document]:
    """The documents (problem and worked solution) behind `synthetic_math_examples`."""
    trained = {math_example(d).prompt for d in synthetic.generate(training_seed)[synthetic.ARITHMETIC]}
    rng = random.Random(SYNTHETIC_EVAL_SEED)
    documents: dict[str, Document] = {}
    for index in range(100 * limit):  # the problem space is large: a repeat is rare, running out impossible
        if len(documents) == limit:
            break
        document = Document(synthetic.ARITHMETIC, f"eval-{index}", synthetic.arithmetic_problem(rng))
        prompt = math_example(document).prompt
        if prompt not in trained:
            documents.setdefault(prompt, document)
    return list(documents.values())


def solution_targets(text: str, tokenizer) -> tuple[list[int], np.ndarray]:
    """A math document's token ids and, per position i, whether token i + 1 is part of its worked solution
    (what follows `Solution:`): the positions whose next-token prediction is the answer."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mark = text.find(SOLUTION_HEADER.strip())
    if mark < 0:
        return encoded["input_ids"], np.zeros(len(encoded["input_ids"]), dtype=bool)
    begin = mark + len(SOLUTION_HEADER.strip())
    in_solution = np.array([start >= begin for start, _ in encoded["offset_mapping"]], dtype=bool)
    return encoded["input_ids"], np.concatenate((in_solution[1:], [False]))
