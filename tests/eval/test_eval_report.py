"""`cognate eval` end to end on a tiny random model, small source files and a folder prepared from them.

A model patched to answer from the gold data must score 1.0 (and 0.0 when it answers wrong): that proves the
whole scoring path, from held-out documents to prompts, generation, stop strings, extraction and the sandbox.
"""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.cli import main
from cognate.data import formatting as fmt
from cognate.data import synthetic
from cognate.data.dataset import PackedDataset
from cognate.data.formatting import Document
from cognate.data.prepare import PrepareConfig, prepare
from cognate.data.readers import SkipLog
from cognate.data.tokenizer import encode_texts, load_tokenizer, train_tokenizer
from cognate.eval import tasks
from cognate.eval.commands import format_report
from cognate.eval.evaluate import (
    EvalConfig,
    EvalError,
    evaluate,
    evaluate_model_dir,
    stream_batches,
    validation_rows,
)
from cognate.export.model_dir import load_model_dir, save_model_dir
from cognate.model.config import CognateConfig
from cognate.model.model import CognateModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # the data tests' source-file writers
import itertools

from sample_sources import gsm8k_row, mbpp_row, write_sample_sources

SHORT_RECORDS = 24  # per short source: 24 GSM8K problems, MBPP ids 1-3, 11, 12 and 601-624, ...
LONG_RECORDS = 6
VOCAB = 400
TABLE_LABELS = ("validation perplexity", "ACT mean steps", "memory (long rows)", "math EM", "MBPP pass@1")


@pytest.fixture(scope="module", autouse=True)
def offline_on_one_thread():
    """No network; one torch thread, because tiny ops on threads that wait for busy cores run 20x slower."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return write_sample_sources(tmp_path_factory.mktemp("sources"), short=SHORT_RECORDS, long=LONG_RECORDS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sources) -> Path:
    texts = [d.text for docs in synthetic.generate(seed=5).values() for d in docs[:150]]
    texts += [p.read_text() for p in sources.rglob("*.json*")]
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB)
    config = CognateConfig(
        name="eval-test",
        vocab_size=len(tokenizer),
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        max_seq_len=384,  # shorter than most QA contexts, so their prompts are cut to fit
        t_train=2,
        t_infer=3,
        act_hidden=16,
        mem_capacity=6,
        mem_topk=3,
        mem_dim=16,
        mem_chunk_size=8,
    )
    torch.manual_seed(0)
    model = CognateModel(config)
    with torch.no_grad():  # a halting head that sends tokens to different steps, as a trained one does
        model.halting.out.weight.normal_(std=3.0)
        model.halting.out.bias.zero_()
    return save_model_dir(model, tmp_path_factory.mktemp("model") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sources, model_dir) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    config = PrepareConfig(
        out=out, source_dir=sources, tokenizer=model_dir, short_len=64, long_len=256, validation_fraction=0.2
    )
    prepare(config, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, model_dir, data_dir, sources):
    """`cognate eval` with every input: (exit code, report, printed table)."""
    path = tmp_path_factory.mktemp("report") / "report.json"
    argv = ["eval", "--model", str(model_dir), "--data", str(data_dir), "--source-dir", str(sources)]
    argv += ["--max-examples", "3", "--max-new-tokens", "12", "--json", str(path), "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(argv)
    return code, json.loads(path.read_text()), printed.getvalue()


def in_unit_range(value) -> bool:
    return 0.0 <= value <= 1.0


def test_report_has_every_section_and_prints_a_table(cli_run):
    code, report, printed = cli_run
    assert code == 0
    for key in ("model", "settings", "validation", "act", "memory", "math", "mbpp", "qa", "generation"):
        assert report[key] is not None, key
    assert report["skipped"] == {}  # the random halting head varies, so even the correlation is measured
    assert report["model"]["tokenizer_sha256"] and report["model"]["parameters"] > 0
    assert all(label in printed for label in (*TABLE_LABELS, "QA EM / F1", "generation check"))


def test_validation_act_and_memory_figures_are_in_range(cli_run):
    _, report, _ = cli_run
    validation = report["validation"]
    # An untrained model is near uniform over the vocabulary: perplexity of the order of its size.
    assert VOCAB / 4 < validation["perplexity"] < VOCAB * 4
    assert math.isclose(validation["perplexity"], math.exp(validation["loss"]), rel_tol=1e-9)
    assert validation["tokens"] == sum(k["tokens"] for k in validation["by_kind"].values()) > 0
    act = report["act"]
    assert 1.0 <= act["mean_steps"] <= act["max_steps"] == 3 and act["var_steps"] > 0
    assert math.isclose(sum(act["step_histogram"].values()), 1.0)
    assert sum(q["tokens"] for q in act["steps_by_loss_quartile"]) == act["tokens"] == validation["tokens"]
    assert -1.0 <= act["loss_step_correlation"] <= 1.0
    memory = report["memory"]
    assert memory["by_kind"]["long"]["rows"] > 0
    for entry in memory["by_kind"].values():  # memory runs at every length, on every kind that has rows
        assert entry["active"] == (entry["rows"] > 0)
        if entry["active"]:
            assert in_unit_range(entry["write_rate"]) and in_unit_range(entry["read_gate"])
            assert 0 < entry["slots_used"] <= memory["capacity"]


def test_long_documents_are_scored_with_and_without_carried_memory(cli_run, data_dir):
    """The QA documents longer than a 256-token row: their loss with the memory carried row to row and with each
    row alone; the same tokens both ways, different losses on the rows after the first (the carry changes them),
    the same on first rows."""
    _, report, printed = cli_run
    context = report["long_context"]
    ids = PackedDataset(data_dir, "validation", "long").documents[:, 0]
    assert context["documents"] == len(np.unique(ids[ids >= 0])) > 0  # every row read (within val_tokens)
    assert (
        0
        < context["later_rows_tokens"]
        < context["tokens"]
        <= report["validation"]["by_kind"]["long"]["tokens"]
    )
    for part in ("", "later_rows_"):
        assert VOCAB / 4 < math.exp(context[f"{part}loss_carried_memory"]) < VOCAB * 4
    assert context["later_rows_loss_carried_memory"] != context["later_rows_loss_rows_alone"]
    first_tokens = context["tokens"] - context["later_rows_tokens"]
    first_carried = (
        context["loss_carried_memory"] * context["tokens"]
        - context["later_rows_loss_carried_memory"] * context["later_rows_tokens"]
    )
    first_alone = (
        context["loss_rows_alone"] * context["tokens"]
        - context["later_rows_loss_rows_alone"] * context["later_rows_tokens"]
    )
    assert first_carried / first_tokens == pytest.approx(first_alone / first_tokens, rel=1e-5)
    assert "long-context loss" in printed


def test_task_scores_are_in_range_and_mbpp_uses_its_test_split(cli_run):
    _, report, _ = cli_run
    assert report["math"]["synthetic"] is False
    assert report["math"]["split"]["validation_fraction"] == 0.2  # read from the prepared folder
    assert set(report["math"]["sources"]) == set(tasks.MATH_SOURCES)
    assert set(report["qa"]["sources"]) == set(tasks.QA_SOURCES)
    for section in ("math", "qa"):
        for entry in report[section]["sources"].values():
            assert 1 <= entry["examples"] <= 3 and in_unit_range(entry["exact_match"])
    assert all(in_unit_range(e["f1"]) for e in report["qa"]["sources"].values())
    assert any(e["truncated_prompts"] for e in report["qa"]["sources"].values())
    mbpp = report["mbpp"]
    assert [p["task_id"] for p in mbpp["predictions"]] == [11, 12]  # the test split only
    assert sum(mbpp["outcomes"].values()) == mbpp["examples"] == 2 and in_unit_range(mbpp["pass_at_1"])
    assert mbpp["isolation"]


def test_every_evaluated_question_is_absent_from_the_training_rows(cli_run, data_dir, model_dir):
    _, report, _ = cli_run
    tokenizer = load_tokenizer(model_dir)
    datasets = [PackedDataset(data_dir, "train", kind) for kind in ("short", "long")]
    train_text = "".join(
        tokenizer.decode(row) for d in datasets for row in d.rows(np.arange(len(d))).tolist()
    )
    assert "Problem: " in train_text and "Question: " in train_text
    questions = [
        p["question"]
        for section in ("math", "qa")
        for entry in report[section]["sources"].values()
        for p in entry["predictions"]
    ]
    assert len(questions) >= 6 and not any(q in train_text for q in questions)


# ---------------------------------------------------------------------------------------------------- scoring path


def answering(tokenizer, continuations: dict[str, str], fallback: str = " I do not know."):
    """A stand-in for `model.generate`: continues each prompt (or the end of it, when the prompt was cut to fit)
    with its entry in `continuations`, token by token as the real one does, then end-of-text."""
    eos = tokenizer.eos_token_id

    def generate(input_ids, max_new_tokens, **_):
        ids = input_ids[0].tolist()
        seen = tokenizer.decode(ids[1:] if ids[0] == eos else ids)
        rest = fallback
        for prompt, continuation in continuations.items():
            full = prompt + continuation
            at = full.find(seen)
            if at >= 0 and at + len(seen) >= len(prompt):
                rest = full[at + len(seen) :]
                break
        new = [*encode_texts(tokenizer, [rest])[0].tolist(), eos] if rest else [eos]
        return torch.tensor([ids + new[:max_new_tokens]])

    return generate


def held_out(sources: Path):
    split, skips = tasks.HeldOutSplit(), SkipLog()
    math_examples = [e for n in tasks.MATH_SOURCES for e in tasks.math_examples(n, sources, split, 3, skips)]
    qa_examples = [e for n in tasks.QA_SOURCES for e in tasks.qa_examples(n, sources, split, 3, skips)]
    return math_examples, tasks.mbpp_examples(sources, 3, skips), qa_examples


@pytest.mark.parametrize("right", [True, False], ids=["right-answers", "wrong-answers"])
def test_a_model_that_answers_from_the_gold_data_scores_one_and_a_wrong_one_zero(right, model_dir, sources):
    math_examples, mbpp_examples, qa_examples = held_out(sources)
    continuations = {}
    for e in math_examples:  # a worked solution, then a next problem the stop strings must cut off
        answer = e.answers[0] if right else e.answers[0] + "1"
        continuations[e.prompt] = f"We add the numbers.\n#### {answer}\n\nProblem: Ann has 2 pens.\n#### 999"
    for e in mbpp_examples:
        code = (
            mbpp_row(int(e.id))["code"].replace("\r\n", "\n") if right else "def unrelated():\n    return 0"
        )
        continuations[e.prompt] = f"{code}\nTask: Write a function.\nTests:\nassert False"
    for e in qa_examples:
        continuations[e.prompt] = (
            f" {e.answers[0] if right else 'nobody knows'}\nQuestion: Why?\nAnswer: Paris"
        )
    model = load_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model.generate = answering(tokenizer, continuations)
    # Room for the whole continuation only in several generation calls: the stop check between them runs.
    config = EvalConfig(source_dir=sources, max_examples=3, math_new_tokens=100, code_new_tokens=100)
    report = evaluate(model, tokenizer, config, log=lambda _: None)

    expected = 1.0 if right else 0.0
    assert {n: s["exact_match"] for n, s in report["math"]["sources"].items()} == dict.fromkeys(
        tasks.MATH_SOURCES, expected
    )
    assert report["mbpp"]["pass_at_1"] == expected and report["mbpp"]["examples"] == 2
    assert report["mbpp"]["outcomes"] == {"passed" if right else "failed": 2}
    for entry in report["qa"]["sources"].values():
        assert entry["exact_match"] == entry["f1"] == expected
    if right:
        assert all(
            p["completion"] == " " + p["gold"][0] for p in report["qa"]["sources"]["hotpotqa"]["predictions"]
        )


def test_gold_math_answers_are_the_source_files_answers(sources):
    examples = tasks.math_examples(
        "gsm8k", sources, tasks.HeldOutSplit(validation_fraction=0.5), 100, SkipLog()
    )
    assert len(examples) == SHORT_RECORDS // 2
    rows = {gsm8k_row(i)["question"]: str(2 * i + 3) for i in range(SHORT_RECORDS)}
    assert {e.question: e.answers[0] for e in examples}.items() <= rows.items()


def test_collapsed_generations_are_flagged(model_dir):
    model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
    colon = int(encode_texts(tokenizer, [":"])[0][0])
    model.generate = lambda ids, n, **_: torch.cat([ids, torch.full((1, n), colon)], dim=1)
    report = evaluate(model, tokenizer, EvalConfig(max_examples=1, sample_new_tokens=40), log=lambda _: None)
    generation = report["generation"]
    assert generation["collapsed"] and generation["top_token"] == ":"
    assert all(s["completion"] == ":" * 40 for s in generation["samples"])


def test_without_data_or_sources_only_synthetic_math_and_the_collapse_check_run(model_dir):
    model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
    report = evaluate(model, tokenizer, EvalConfig(max_examples=4, math_new_tokens=8), log=lambda _: None)
    for section in ("validation", "act", "memory", "mbpp", "qa"):
        assert report[section] is None and report["skipped"][section]
    math_section = report["math"]
    assert math_section["synthetic"] and list(math_section["sources"]) == ["synthetic_arithmetic"]
    entry = math_section["sources"]["synthetic_arithmetic"]
    assert entry["examples"] == 4 and in_unit_range(entry["exact_match"])
    trained = "\n".join(d.text for d in synthetic.generate(0)[synthetic.ARITHMETIC])
    assert not any(p["question"] in trained for p in entry["predictions"])
    assert report["generation"]["num_texts"] == 8
    table = format_report(report)
    assert "math EM (SYNTHETIC)" in table and "needs --source-dir" in table and "needs --data" in table


def test_a_data_folder_with_another_tokenizer_is_refused(tmp_path, model_dir, data_dir, capsys):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalError, match="tokenizer"):
        evaluate_model_dir(model_dir, EvalConfig(data=tmp_path))
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(EvalError, match="max_examples=0"):
        EvalConfig(max_examples=0)
    with pytest.raises(EvalError, match="source_dir"):
        EvalConfig(source_dir=tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------- pure parts

LINE = st.text(st.characters(codec="ascii", exclude_characters="\n\r#"), min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and s
)


@settings(max_examples=50, deadline=None)
@given(question=LINE, steps=st.lists(LINE, max_size=3), answer=LINE)
def test_math_documents_parse_back_into_prompt_question_and_answer(question, steps, answer):
    text = fmt.math_text(question, "\n".join(steps), answer)
    example = tasks.math_example(Document("gsm8k", "g", text))
    assert example.prompt == f"Problem: {question}\nSolution:\n" and text.startswith(example.prompt)
    assert (example.question, example.answers) == (question, (answer,))


@settings(max_examples=50, deadline=None)
@given(paragraphs=st.lists(st.tuples(LINE, LINE), min_size=1, max_size=3), question=LINE, answer=LINE)
def test_qa_documents_parse_back_into_prompt_question_and_answer(paragraphs, question, answer):
    text = fmt.context_qa_text(paragraphs, question, answer)
    example = tasks.qa_example(Document("hotpotqa", "g", text))
    assert example.prompt.endswith(f"Question: {question}\nAnswer:") and text.startswith(example.prompt)
    assert (example.question, example.answers) == (question, (answer,))


@settings(max_examples=100, deadline=None)
@given(
    short=st.integers(0, 500),
    long=st.integers(0, 60),
    budget=st.one_of(st.none(), st.integers(1, 400_000)),
)
def test_validation_rows_keep_the_short_long_mix_within_the_budget(short, long, budget):
    available = {"short": (short, 512), "long": (long, 4096)}
    chosen = validation_rows(available, budget)
    for kind, (n, _) in available.items():
        rows = chosen[kind]
        assert len(set(rows.tolist())) == len(rows) and np.all(np.diff(rows) > 0)
        assert (len(rows) == n) if budget is None else (min(n, 1) <= len(rows) <= n)
        assert rows.size == 0 or 0 <= rows.min() <= rows.max() < n
    total = short * 512 + long * 4096
    if budget is not None and total > budget:
        share = budget / total  # every kind keeps this share of its rows, to the nearest row (at least one)
        assert all(abs(len(chosen[k]) - share * n) <= 1 for k, (n, _) in available.items())
        assert sum(len(chosen[k]) * seq_len for k, (_, seq_len) in available.items()) <= budget + 512 + 4096


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=30),
    n_streams=st.integers(1, 5),
    seed=st.integers(0, 9),
)
def test_validation_keeps_long_documents_whole_and_reads_their_rows_in_order_in_one_stream(
    sizes, n_streams, seed
):
    ids = np.concatenate([np.full(n, doc if n > 1 else -1) for doc, n in enumerate(sizes)])
    rows = validation_rows({"long": (len(ids), 256)}, 256 * (seed + 1), {"long": ids})["long"]
    for doc in np.unique(ids[ids >= 0]):  # a document is read whole or not at all
        assert (
            np.isin(np.flatnonzero(ids == doc), rows).all()
            or not np.isin(np.flatnonzero(ids == doc), rows).any()
        )
    batches = stream_batches(rows, ids, n_streams)
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()
    assert all(len(a) >= len(b) for a, b in itertools.pairwise(batches))  # longest streams first
    # Row k + 1 of a document follows row k in the next batch, at the same position.
    for doc in np.unique(ids[rows][ids[rows] >= 0]):
        where = [
            (j, list(batch).index(r))
            for r in np.flatnonzero(ids == doc)
            for j, batch in enumerate(batches)
            if r in batch
        ]
        assert [j for j, _ in where] == list(range(where[0][0], where[0][0] + len(where)))
        assert len({b for _, b in where}) == 1
