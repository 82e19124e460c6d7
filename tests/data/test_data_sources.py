"""Each source's loader on small files in its published format, and the hub path's mapping to the same records."""

import csv
import io
import json
from pathlib import Path

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_sources import (
    gsm8k_row,
    hotpot_original,
    leval_row,
    musique_row,
    narrativeqa_row,
    svamp_row,
    twowiki_row,
    write_jsonl,
    write_sample_sources,
)

from cognate.data import sources as src
from cognate.data.readers import DataFormatError, FieldError, SkipLog


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return write_sample_sources(tmp_path_factory.mktemp("sources"))


def load(name: str, folder: Path, skips: SkipLog | None = None) -> src.LoadedSource:
    return src.load_local(src.SOURCES[name], folder, skips)


def test_registry_has_the_eleven_file_sources_and_infill():
    assert len(src.SOURCE_ORDER) == 12
    assert src.SOURCE_ORDER[5] == src.INFILL
    assert {src.SIDES[n] for n in src.SOURCE_ORDER[:6]} == {src.SHORT}
    assert {src.SIDES[n] for n in src.SOURCE_ORDER[6:]} == {src.LONG}


def test_gsm8k_marks_the_final_answer_and_drops_calculator_annotations(sample_dir):
    docs = load("gsm8k", sample_dir).documents
    assert len(docs) == 24
    text = docs[5].text
    assert text.startswith("Problem: Tom has 5 apples")
    assert text.endswith("#### 13")
    assert "<<" not in text and "5 + 8 = 13 apples" in text


def test_svamp_fills_in_numbers_and_writes_the_equation_infix(sample_dir):
    text = load("svamp", sample_dir).documents[0].text
    assert "Ann has 2 pens in each of 3 boxes" in text
    assert "2 * 3 = 6" in text and text.endswith("#### 6")


@pytest.mark.parametrize(
    ("equation", "numbers", "expected"),
    [
        ("- number0 * number1 number2", "9 2 3", "9 - 2 * 3"),
        ("* number2 - number0 number1", "9 2 3", "3 * (9 - 2)"),
        ("- number0 - number1 number2", "9 2 3", "9 - (2 - 3)"),
        ("/ - number0 number1 number2", "9 2 3", "(9 - 2) / 3"),
        ("* * * number0 number1 number2 0.01", "9 2 3", "9 * 2 * 3 * 0.01"),
    ],
)
def test_svamp_prefix_equations_keep_their_meaning(equation, numbers, expected):
    row = {"Question": "number0 number1 number2 ?", "Numbers": numbers, "Equation": equation, "Answer": "1.0"}
    assert f"{expected} = 1" in src.parse_svamp(row).text
    assert eval(expected) == eval(equation_infix(equation, numbers.split()))  # same value as the prefix form


def equation_infix(equation: str, numbers: list[str]) -> str:
    def value(tokens):
        head = tokens.pop(0)
        if head in "+-*/":
            left, right = value(tokens), value(tokens)
            return f"({left} {head} {right})"
        return numbers[int(head[6:])] if head.startswith("number") else head

    return value(equation.split())


def test_asdiv_reads_the_xml_and_strips_the_unit(sample_dir):
    docs = load("asdiv", sample_dir).documents
    assert [d.group for d in docs[:2]] == ["nluds-0001", "nluds-0002"]
    assert docs[0].text == (
        "Problem: Mia has 1 red balls and 2 blue balls. How many balls does Mia have?\nSolution:\n1+2=3\n#### 3"
    )


def test_mbpp_leaves_out_the_test_split_used_for_evaluation(sample_dir):
    loaded = load("mbpp", sample_dir)
    ids = {int(d.group) for d in loaded.documents}
    assert loaded.excluded == 2 and not ids & set(range(11, 511))
    text = next(d.text for d in loaded.documents if d.group == "601")
    assert (
        text
        == "Task: Write a function that adds 601 to a number.\nTests:\nassert add_601(1) == 602\nCode:\n"
        + ("def add_601(x):\n  return x + 601")
    )


def test_codexglue_pairs_buggy_and_fixed_lines_from_every_file(sample_dir):
    docs = load("codexglue_refinement", sample_dir).documents
    assert len(docs) == 4 * 6
    assert docs[0].text.startswith("Buggy code:\npublic int METHOD_0 ( ) { return VAR_0 - 1 ; }")
    assert "\nFixed code:\npublic int METHOD_0 ( ) { return VAR_0 ; }" in docs[0].text


def test_hotpotqa_reads_both_published_formats_and_counts_a_shared_question_once(sample_dir):
    docs = load("hotpotqa", sample_dir).documents
    assert sorted(d.group for d in docs) == sorted(f"hp{i}" for i in range(12))
    text = next(d.text for d in docs if d.group == "hp7")
    assert text.startswith("Paragraph: Title 7-0\n") and text.endswith(
        "Question: Which town was built first, 7 or 8?\nAnswer: answer 7"
    )


def test_2wiki_uses_evidence_triples_when_a_record_has_no_context(sample_dir):
    docs = {d.group: d.text for d in load("2wikimultihopqa", sample_dir).documents}
    assert docs["tw0"].startswith("Paragraph: Facts\nFilm 0 | director | Person 0")
    assert docs["tw1"].startswith("Paragraph: Title 1-0\n")
    assert docs["tw1"].endswith("Answer: Person 1")


def test_musique_keeps_every_paragraph_before_the_question(sample_dir):
    text = load("musique", sample_dir).documents[0].text
    assert text.count("Paragraph: ") == 5
    assert text.index("Paragraph: Title 0-4") < text.index("Question: What is the seat of county 0?")


def test_leval_sources_put_the_whole_article_before_every_question(sample_dir):
    quality = load("quality", sample_dir).documents
    assert len(quality) == 6
    text = quality[0].text
    assert text.startswith("Article:\n") and text.count("Question: ") == 3
    assert text.index("Question: ") > len(leval_row(0)["input"])
    assert (
        "Question: What was built in town 0, part 0?\n\n (A) a lamp\n (B) a road\nAnswer: (A) a lamp 0"
        in text
    )


def test_questions_about_one_article_become_one_document(sample_dir):
    qasper = load("qasper", sample_dir).documents
    assert len(qasper) == 6  # seven records, one paper listed twice
    assert all(d.text.count("Question: ") == 3 for d in qasper)
    narrative = load("narrativeqa", sample_dir).documents
    assert len(narrative) == 6 and all(d.text.count("Question: ") == 2 for d in narrative)


def test_narrativeqa_mojibake_is_repaired(sample_dir):
    text = load("narrativeqa", sample_dir).documents[0].text
    assert "The hero\u2019s journey ends." in text and "\x80" not in text


def test_inputs_are_hashed(sample_dir):
    inputs = load("hotpotqa", sample_dir).inputs
    assert [e["path"] for e in inputs] == list(src.SOURCES["hotpotqa"].files)
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in inputs)


# ------------------------------------------------------------------------------------------------ bad input


def bad_copy(tmp_path: Path, relative: str, content: str) -> Path:
    folder = tmp_path / "src"
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return folder


def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps(gsm8k_row(0)), "{not json", json.dumps(gsm8k_row(1))]
    folder = bad_copy(tmp_path, "gsm8k/train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"gsm8k/train.jsonl:2: not valid JSON") as error:
        load("gsm8k", folder)
    assert error.value.location.line == 2


def test_a_missing_field_is_named_by_file_line_and_field(tmp_path):
    rows = [gsm8k_row(0), {"question": "no answer here"}]
    folder = bad_copy(tmp_path, "gsm8k/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=r"gsm8k/train.jsonl:2: field 'answer': missing") as error:
        load("gsm8k", folder)
    assert error.value.field == "answer"


def test_a_field_of_the_wrong_type_is_named(tmp_path):
    row = {**musique_row(0), "paragraphs": "not a list"}
    folder = bad_copy(tmp_path, "musique/musique.json", json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=r"musique/musique.json:1: field 'paragraphs': expected a list"):
        load("musique", folder)


def test_a_file_in_the_wrong_format_is_reported(tmp_path):
    # A CSV where JSON Lines belong, and JSON where the CSV belongs.
    folder = bad_copy(tmp_path, "quality/quality.jsonl", "input,instructions\nan article,a question\n")
    with pytest.raises(DataFormatError, match=r"quality/quality.jsonl:1: not valid JSON"):
        load("quality", folder)
    folder = bad_copy(tmp_path, "svamp/mawps-asdiv-a_svamp/train.csv", json.dumps(svamp_row(0)) + "\n")
    with pytest.raises(DataFormatError, match=r"train.csv:1: field 'Question': missing CSV column"):
        load("svamp", folder)


def test_broken_xml_is_reported_with_its_line(tmp_path):
    folder = bad_copy(
        tmp_path, "asdiv/ASDiv.xml", "<ProblemSet>\n<Problem ID='1'>\n<Body>x</Body>\n</ProblemSet>\n"
    )
    with pytest.raises(DataFormatError, match=r"asdiv/ASDiv.xml:4: not well-formed XML"):
        load("asdiv", folder)


def test_a_json_array_reports_the_line_of_the_bad_record(tmp_path):
    records = json.dumps([hotpot_original(0), {"_id": "x", "question": "q?"}], indent=1)
    folder = bad_copy(tmp_path, "2wikimultihopqa/wikihop.json", records)
    with pytest.raises(DataFormatError, match=r"wikihop.json:\d+: field 'answer': missing") as error:
        load("2wikimultihopqa", folder)
    assert error.value.location.line == records.splitlines().index(" {", 2) + 1


def test_parallel_files_of_different_lengths_are_reported(tmp_path, sample_dir):
    folder = tmp_path / "src"
    for relative in src.SOURCES["codexglue_refinement"].files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text((sample_dir / relative).read_text())
    fixed = folder / "codexglue_code_refinement/small/test.buggy-fixed.fixed"
    fixed.write_text("\n".join(fixed.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(
        DataFormatError, match=r"small/test.buggy-fixed.fixed:6: parallel files differ in length"
    ):
        load("codexglue_refinement", folder)


def test_skip_bad_skips_and_counts_instead_of_stopping(tmp_path):
    lines = [
        json.dumps(gsm8k_row(0)),
        "{not json",
        json.dumps({"question": "q"}),
        "[1, 2]",
        json.dumps(gsm8k_row(1)),
    ]
    folder = bad_copy(tmp_path, "gsm8k/train.jsonl", "\n".join(lines) + "\n")
    skips = SkipLog()
    assert len(load("gsm8k", folder, skips).documents) == 2
    assert skips.to_json()["gsm8k"]["count"] == 3
    assert skips.to_json()["gsm8k"]["first"][1] == "gsm8k/train.jsonl:3: field 'answer': missing"


def test_skip_bad_also_survives_a_broken_file(tmp_path):
    folder = bad_copy(tmp_path, "asdiv/ASDiv.xml", "<ProblemSet><Problem>")
    skips = SkipLog()
    assert load("asdiv", folder, skips).documents == []
    assert skips.files == {"asdiv": 1} and skips.counts == {}  # its records could not be counted
    assert skips.to_json()["asdiv"]["files_dropped"] == 1


def _svamp_csv(rows: list[dict]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(svamp_row(0)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def _spoil(data: bytes, needle: str, replacement: bytes) -> bytes:
    assert needle.encode() in data
    return data.replace(needle.encode(), replacement, 1)


def test_skip_bad_counts_every_record_it_drops_and_no_other(tmp_path):
    relative = "svamp/mawps-asdiv-a_svamp/train.csv"
    rows = [svamp_row(i) for i in range(60)]
    clean = len(load("svamp", bad_copy(tmp_path / "clean", relative, _svamp_csv(rows).decode())).documents)
    rows[10] = {**rows[10], "Body": "x" * 200_000}  # over the CSV module's 128 KB field limit
    rows[40] = {**rows[40], "Equation": "+ " * 5000 + "number0 " * 5001}  # recursion deeper than Python's
    data = _svamp_csv(rows)
    data = _spoil(data, "for class 20 ", b"for class 20 \xff")  # not UTF-8
    data = _spoil(data, "for class 30 ", b"for class 30 \x00")  # a NUL byte
    path = tmp_path / "bad" / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    skips = SkipLog()
    kept = len(load("svamp", tmp_path / "bad", skips).documents)
    assert skips.counts == {"svamp": clean - kept} and clean - kept == 4, skips.examples
    assert skips.files == {}
    with pytest.raises(DataFormatError, match=rf"{relative}:12: malformed CSV \(field larger"):
        load("svamp", tmp_path / "bad")


def test_deep_nesting_is_one_error_with_file_and_line(tmp_path):
    lines = [json.dumps(gsm8k_row(0)), "[" * 100_000 + "]" * 100_000, json.dumps(gsm8k_row(1))]
    folder = bad_copy(tmp_path, "gsm8k/train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"^gsm8k/train.jsonl:2: nested too deeply"):
        load("gsm8k", folder)
    skips = SkipLog()
    assert len(load("gsm8k", folder, skips).documents) == 2 and skips.counts == {"gsm8k": 1}
    row = {**svamp_row(0), "Equation": "+ " * 5000 + "number0 " * 5001}
    folder = bad_copy(tmp_path / "svamp", "svamp/mawps-asdiv-a_svamp/train.csv", _svamp_csv([row]).decode())
    with pytest.raises(DataFormatError, match=r"train.csv:2: nested too deeply"):
        load("svamp", folder)


# ------------------------------------------------------------------------------------------------ hub path


def hub_loader(monkeypatch, rows_by_path: dict[str, list[dict]]):
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_list(rows_by_path[data_files or path])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def local_texts(tmp_path: Path, relative: str, rows: list[dict], name: str) -> list[str]:
    write_jsonl(tmp_path / "local" / relative, rows)
    return [d.text for d in load(name, tmp_path / "local").documents]


def test_hub_gsm8k_gives_the_same_documents_as_the_local_file(tmp_path, monkeypatch):
    rows = [gsm8k_row(i) for i in range(3)]
    calls = hub_loader(monkeypatch, {"openai/gsm8k": rows})
    hub = src.load_hub(src.SOURCES["gsm8k"], None)
    assert calls == [("openai/gsm8k", "main", "train", None)]
    assert [d.text for d in hub.documents] == local_texts(tmp_path, "gsm8k/train.jsonl", rows, "gsm8k")
    assert hub.inputs == [{"path": "hub:openai/gsm8k[main][train]"}]


def test_hub_hotpotqa_columns_map_to_the_original_format(tmp_path, monkeypatch):
    original = hotpot_original(3)
    hub_row = {
        "id": original["_id"],
        "question": original["question"],
        "answer": original["answer"],
        "type": "comparison",
        "level": "hard",
        "supporting_facts": {"title": ["Title 3-0"], "sent_id": [0]},
        "context": {
            "title": [t for t, _ in original["context"]],
            "sentences": [s for _, s in original["context"]],
        },
    }
    hub_loader(monkeypatch, {"hotpotqa/hotpot_qa": [hub_row]})
    hub = src.load_hub(src.SOURCES["hotpotqa"], None)
    write_jsonl(tmp_path / "local/hotpotqa/ircot_processed/dev_subsampled.jsonl", [])
    local = local_texts(tmp_path, "hotpotqa/migres/hotpot.json", [original], "hotpotqa")
    assert [d.text for d in hub.documents] == local
    assert hub.documents[0].group == "hp3"


def test_hub_asdiv_and_svamp_records_map_to_the_published_fields(monkeypatch):
    asdiv_row = {
        "body": "Mia has 2 balls.",
        "question": "How many?",
        "solution_type": "x",
        "answer": "2 (balls)",
        "formula": "2=2",
    }
    svamp = {**svamp_row(1), "Answer": 9.0}  # the csv builder types the column
    hub_loader(
        monkeypatch, {"EleutherAI/asdiv": [asdiv_row], src.SOURCES["svamp"].hub[0].data_files: [svamp]}
    )
    assert src.load_hub(src.SOURCES["asdiv"], None).documents[0].text.endswith("2=2\n#### 2")
    assert src.load_hub(src.SOURCES["svamp"], None).documents[0].text.endswith("3 * 3 = 9\n#### 9")


def test_hub_reading_sources_map_to_the_published_fields(tmp_path, monkeypatch):
    narrative = narrativeqa_row(2)
    hub_row = {
        "document": {"id": "d", "kind": "movie", "summary": {"text": narrative["passage"], "tokens": []}},
        "question": {"text": narrative["question"], "tokens": []},
        "answers": [{"text": a, "tokens": []} for a in narrative["answer"]],
    }
    quality = leval_row(4)
    hub_loader(
        monkeypatch, {"deepmind/narrativeqa": [hub_row], src.SOURCES["quality"].hub[0].data_files: [quality]}
    )
    assert [d.text for d in src.load_hub(src.SOURCES["narrativeqa"], None).documents] == local_texts(
        tmp_path, "narrativeqa/test-tiny.jsonl", [narrative], "narrativeqa"
    )
    assert [d.text for d in src.load_hub(src.SOURCES["quality"], None).documents] == local_texts(
        tmp_path, "quality/quality.jsonl", [quality], "quality"
    )


def test_hub_2wiki_accepts_column_wise_context(tmp_path, monkeypatch):
    row = twowiki_row(5)
    hub_row = {
        **row,
        "supporting_facts": {"title": ["Title 5-0"], "sent_id": [0]},
        "context": {"title": [t for t, _ in row["context"]], "content": [s for _, s in row["context"]]},
    }
    hub_loader(monkeypatch, {src.SOURCES["2wikimultihopqa"].hub[0].data_files: [hub_row]})
    hub = src.load_hub(src.SOURCES["2wikimultihopqa"], None)
    assert [d.text for d in hub.documents] == local_texts(
        tmp_path, "2wikimultihopqa/wikihop.json", [row], "2wikimultihopqa"
    )


def test_hub_records_with_bad_fields_name_the_hub_row(monkeypatch):
    hub_loader(monkeypatch, {"openai/gsm8k": [gsm8k_row(0), {"question": "q", "answer": "no mark"}]})
    with pytest.raises(DataFormatError, match=r"hub:openai/gsm8k\[main\]\[train\]:2: field 'answer'"):
        src.load_hub(src.SOURCES["gsm8k"], None)


FIELDS = {
    "gsm8k": ["question", "answer"],
    "svamp": ["Question", "Numbers", "Equation", "Answer"],
    "asdiv": ["ID", "Body", "Question", "Answer", "Formula"],
    "mbpp": ["task_id", "text", "code", "test_list"],
    "codexglue_refinement": ["buggy", "fixed"],
    "hotpotqa": [
        "_id",
        "question",
        "answer",
        "context",
        "question_id",
        "question_text",
        "answers_objects",
        "contexts",
    ],
    "2wikimultihopqa": ["_id", "question", "answer", "context", "evidences"],
    "musique": ["id", "question", "answer", "paragraphs"],
    "quality": ["input", "instructions", "outputs"],
    "qasper": ["input", "instructions", "outputs"],
    "narrativeqa": ["passage", "question", "answer"],
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 700)
    | st.text(max_size=8)
    | st.sampled_from(["#### 4", "number0", "+ 1 2"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["spans", "title", "paragraph_text"]), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(FIELDS)), st.data())
def test_any_record_parses_or_names_the_bad_field(name, data):
    values = (
        st.text(min_size=1, max_size=8) | json_values
    )  # plain text often, so parsing gets past the first field
    record = data.draw(st.dictionaries(st.sampled_from(FIELDS[name]), values))
    try:
        parsed = src.SOURCES[name].parse(record)
    except FieldError as error:
        assert error.field in FIELDS[name]
    else:
        assert parsed is None or isinstance(parsed, (src.Item, src.ReadingItem))
        if isinstance(parsed, src.Item):
            assert isinstance(parsed.key, str) and isinstance(parsed.text, str)
