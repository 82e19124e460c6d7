"""Small files in each dataset's published format, laid out like ../shared/data, for the data tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

WORDS = [
    "river",
    "stone",
    "lamp",
    "orchard",
    "copper",
    "violin",
    "harbor",
    "meadow",
    "signal",
    "lantern",
    "cedar",
    "falcon",
]


def sentence(i: int, j: int) -> str:
    return f"The {WORDS[(i + j) % len(WORDS)]} of town {i} was built in year {1800 + 7 * j + i}."


def paragraph(i: int, j: int, sentences: int = 4) -> str:
    return " ".join(sentence(i, j * sentences + k) for k in range(sentences))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def gsm8k_row(i: int) -> dict:
    return {
        "question": f"Tom has {i} apples and buys {i + 3} more. How many apples does Tom have?",
        "answer": f"Tom has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}",
    }


def svamp_row(i: int) -> dict:
    return {
        "Question": f"Ann has number0 pens in each of number1 boxes for class {i} . How many pens does she have ?",
        "Numbers": f"{i + 2}.0 3.0",
        "Equation": "* number0 number1",
        "Answer": f"{3 * (i + 2)}.0",
        "group_nums": "[1, 2]",
        "Body": "",
        "Ques": "",
    }


def asdiv_problem(i: int) -> str:
    return (
        f'\t<Problem ID="nluds-{i:04d}" Grade="1" Source="test">\n'
        f"\t\t<Body>Mia has {i} red balls and {i + 1} blue balls.</Body>\n"
        f"\t\t<Question>How many balls does Mia have?</Question>\n"
        f"\t\t<Solution-Type>Addition</Solution-Type>\n"
        f"\t\t<Answer>{2 * i + 1} (balls)</Answer>\n"
        f"\t\t<Formula>{i}+{i + 1}={2 * i + 1}</Formula>\n"
        f"\t</Problem>\n"
    )


def mbpp_row(task_id: int) -> dict:
    return {
        "text": f"Write a function that adds {task_id} to a number.",
        "code": f"def add_{task_id}(x):\r\n  return x + {task_id}",
        "task_id": task_id,
        "test_setup_code": "",
        "test_list": [f"assert add_{task_id}(1) == {task_id + 1}"],
        "challenge_test_list": [],
    }


def context(i: int, n: int = 4) -> list:
    return [[f"Title {i}-{j}", [sentence(i, 3 * j + k) for k in range(3)]] for j in range(n)]


def hotpot_original(i: int) -> dict:
    return {
        "_id": f"hp{i}",
        "answer": f"answer {i}",
        "question": f"Which town was built first, {i} or {i + 1}?",
        "supporting_facts": [[f"Title {i}-0", 0]],
        "context": context(i),
        "type": "comparison",
        "level": "hard",
    }


def hotpot_ircot(i: int) -> dict:
    return {
        "question_id": f"hp{i}",
        "question_text": f"Which town was built first, {i} or {i + 1}?",
        "answers_objects": [
            {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": [f"answer {i}"]}
        ],
        "contexts": [
            {
                "id": str(j),
                "title": f"Title {i}-{j}",
                "paragraph_text": paragraph(i, j),
                "is_supporting": j == 0,
            }
            for j in range(4)
        ],
    }


def twowiki_row(i: int, with_context: bool = True) -> dict:
    row = {
        "_id": f"tw{i}",
        "type": "compositional",
        "question": f"Who directed the film of town {i}?",
        "supporting_facts": [[f"Title {i}-0", 0]],
        "evidences": [[f"Film {i}", "director", f"Person {i}"]],
        "answer": f"Person {i}",
    }
    if with_context:
        row["context"] = context(i)
    return row


def musique_row(i: int) -> dict:
    return {
        "id": f"2hop__{i}_{i + 1}",
        "paragraphs": [
            {"idx": j, "title": f"Title {i}-{j}", "paragraph_text": paragraph(i, j), "is_supporting": j == 1}
            for j in range(5)
        ],
        "question": f"What is the seat of county {i}?",
        "question_decomposition": [],
        "answer": f"Seat {i}",
        "answer_aliases": [],
        "answerable": True,
    }


def article(i: int, paragraphs: int = 12) -> str:
    return "\n\n".join(paragraph(i, j, 6) for j in range(paragraphs))


def leval_row(i: int, questions: int = 3) -> dict:
    return {
        "input": article(i),
        "instructions": [
            f"What was built in town {i}, part {q}?\n\n (A) a lamp \n (B) a road " for q in range(questions)
        ],
        "outputs": [f"(A) a lamp {q}" for q in range(questions)],
        "source": "test",
        "evaluation": "exam",
    }


def narrativeqa_row(i: int, question: int = 0) -> dict:
    return {
        "question": f"Why does hero {i} leave home ({question})?",
        "answer": [f"To find town {i}.", "Adventure."],
        "passage": article(i, 4) + " The heroâ\x80\x99s journey ends.",
    }


def write_sample_sources(folder: Path, short: int = 24, long: int = 6) -> Path:
    """Every source in its published format: `short` records per short source, `long` per long source."""
    write_jsonl(folder / "gsm8k/train.jsonl", [gsm8k_row(i) for i in range(short)])

    svamp = folder / "svamp/mawps-asdiv-a_svamp/train.csv"
    svamp.parent.mkdir(parents=True)
    with svamp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(svamp_row(0)))
        writer.writeheader()
        writer.writerows(svamp_row(i) for i in range(short))

    (folder / "asdiv").mkdir()
    (folder / "asdiv/ASDiv.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8" ?>\n<Machine-Reading-Corpus-File>\n<ProblemSet>\n'
        + "".join(asdiv_problem(i) for i in range(1, short + 1))
        + "</ProblemSet>\n</Machine-Reading-Corpus-File>\n",
        encoding="utf-8",
    )

    # Ids 11-510 are MBPP's test split: the loader must leave them out.
    write_jsonl(
        folder / "mbpp/mbpp.jsonl", [mbpp_row(t) for t in (*range(1, 4), 11, 12, *range(601, 601 + short))]
    )

    for size in ("small", "medium"):
        for split in ("valid", "test"):
            stem = folder / f"codexglue_code_refinement/{size}/{split}.buggy-fixed"
            stem.parent.mkdir(parents=True, exist_ok=True)
            tag = f"{size}_{split}"
            pairs = [
                (
                    f"public int METHOD_{i} ( ) {{ return VAR_{i} - 1 ; }}",
                    f"public int METHOD_{i} ( ) {{ return VAR_{i} ; }}",
                )
                for i in range(short // 4)
            ]
            Path(f"{stem}.buggy").write_text("".join(f"{b} // {tag}\n" for b, _ in pairs), encoding="utf-8")
            Path(f"{stem}.fixed").write_text("".join(f"{f} // {tag}\n" for _, f in pairs), encoding="utf-8")

    write_jsonl(
        folder / "hotpotqa/ircot_processed/dev_subsampled.jsonl", [hotpot_ircot(i) for i in range(long)]
    )
    # The MIGRES copy overlaps the IRCoT one by one question (hp{long-1}), which must count once.
    write_jsonl(
        folder / "hotpotqa/migres/hotpot.json", [hotpot_original(i) for i in range(long - 1, 2 * long)]
    )
    write_jsonl(
        folder / "2wikimultihopqa/wikihop.json",
        [twowiki_row(i, with_context=i % 3 != 0) for i in range(long)],
    )
    write_jsonl(folder / "musique/musique.json", [musique_row(i) for i in range(long)])
    write_jsonl(folder / "quality/quality.jsonl", [leval_row(i) for i in range(long)])
    # Qasper's L-Eval copy lists one paper twice: one document, questions merged.
    write_jsonl(folder / "qasper/scientific_qa.jsonl", [leval_row(100 + i) for i in (*range(long), 0)])
    write_jsonl(
        folder / "narrativeqa/test-tiny.jsonl", [narrativeqa_row(i, q) for i in range(long) for q in range(2)]
    )
    return folder
