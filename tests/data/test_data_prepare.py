"""`cognate data prepare` end to end on small files, the prepared folder's reader, and the batch order."""

import itertools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_sources import gsm8k_row, write_jsonl, write_sample_sources

from cognate.cli import main
from cognate.data import sources as src
from cognate.data.dataset import MixedBatchSampler, PackedDataset, read_manifest
from cognate.data.prepare import ConfigError, MissingSourcesError, PrepareConfig, prepare
from cognate.data.readers import DataFormatError
from cognate.data.tokenizer import load_tokenizer

SMALL = {"vocab_size": 600, "short_len": 64, "long_len": 256, "validation_fraction": 0.2}
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return write_sample_sources(tmp_path_factory.mktemp("sources"), short=40, long=8)


@pytest.fixture(scope="module")
def prepared(sample_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare(PrepareConfig(out=out, source_dir=sample_dir, **SMALL), log=lambda _: None)


def test_manifest_lists_all_twelve_sources_with_train_and_validation_counts(prepared):
    out, manifest = prepared
    assert list(manifest["sources"]) == list(src.SOURCE_ORDER)
    for name, entry in manifest["sources"].items():
        assert entry["side"] == src.SIDES[name]
        assert entry["train"]["documents"] > 0 and entry["train"]["tokens"] > 0, name
        assert set(entry["validation"]) >= {"documents", "tokens"}
    assert read_manifest(out) == manifest
    assert manifest["synthetic"] is False and manifest["seed"] == 0
    assert manifest["sources"]["mbpp"]["excluded_records"] == 2


def test_the_short_share_of_tokens_meets_the_target(prepared):
    _, manifest = prepared
    sources = manifest["sources"].values()
    used = sum(e["train"]["tokens"] for e in sources)
    short = sum(e["train"]["tokens"] for e in sources if e["side"] == "short")
    assert manifest["short_ratio"] == pytest.approx(short / used, abs=1e-4)
    largest = max(e["train"]["available_tokens"] / e["train"]["available_documents"] for e in sources)
    assert abs(manifest["short_ratio"] - 0.45) <= 2 * largest / used


def test_manifest_records_hashes_tokenizer_and_timings(prepared, sample_dir):
    out, manifest = prepared
    assert {e["path"] for e in manifest["inputs"]} == {p for s in src.SOURCES.values() for p in s.files}
    assert all(len(e["sha256"]) == 64 for e in manifest["inputs"])
    assert manifest["tokenizer"]["vocab_size"] == manifest["vocab_size"] == len(load_tokenizer(out)) == 600
    for stage in ("load", "tokenizer", "encode", "pack", "write"):
        assert manifest["timings"][stage]["tokens_per_second"] > 0


def test_rows_are_stored_as_uint16_shards_of_seq_len_plus_one(prepared):
    out, manifest = prepared
    for split in ("train", "validation"):
        for kind, seq_len in (("short", 64), ("long", 256)):
            for shard in manifest["shards"][split][kind]:
                assert (out / shard["path"]).stat().st_size == shard["rows"] * (seq_len + 1) * 2


def test_packed_dataset_gives_shifted_targets_masked_across_documents(prepared):
    out, manifest = prepared
    special = manifest["tokenizer"]["special_token_ids"]
    for kind, seq_len in (("short", 64), ("long", 256)):
        data = PackedDataset(out, "train", kind)
        assert len(data) == manifest["rows"]["train"][kind]["rows"] > 0
        inputs, targets = data[len(data) - 1]
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (seq_len,)
        row = torch.from_numpy(data.rows([len(data) - 1])[0].astype(np.int64))
        assert torch.equal(inputs, row[:-1])
        learned = targets != -100
        assert torch.equal(targets[learned], row[1:][learned])
        assert not (learned & (inputs == special["eos"])).any()
        assert not (targets == special["pad"]).any()


def test_validation_is_held_out_by_document(prepared, sample_dir):
    out, _ = prepared
    tokenizer = load_tokenizer(out)

    def questions(split: str) -> set[str]:
        data = PackedDataset(out, split, "long")
        text = "".join(tokenizer.decode(r.tolist()) for r in data.rows(range(len(data))))
        return {line for line in text.splitlines() if line.startswith("Question: ")}

    train, validation = questions("train"), questions("validation")
    assert validation and not train & validation


def test_preparing_is_deterministic_for_a_seed(prepared, sample_dir, tmp_path):
    _, manifest = prepared
    again = prepare(PrepareConfig(out=tmp_path / "again", source_dir=sample_dir, **SMALL), log=lambda _: None)
    other = prepare(
        PrepareConfig(out=tmp_path / "other", source_dir=sample_dir, seed=1, **SMALL), log=lambda _: None
    )
    assert again["shards"] == manifest["shards"] and again["tokenizer"] == manifest["tokenizer"]
    assert other["shards"] != manifest["shards"]


def test_a_given_tokenizer_is_used_instead_of_training_one(prepared, sample_dir, tmp_path):
    out, manifest = prepared
    given = prepare(
        PrepareConfig(
            out=tmp_path / "given",
            source_dir=sample_dir,
            tokenizer=out / "tokenizer.json",
            short_len=64,
            long_len=256,
            validation_fraction=0.2,
        ),
        log=lambda _: None,
    )
    assert given["tokenizer"]["trained"] is False
    assert given["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert given["shards"] == manifest["shards"]


def copy_sources(sample_dir: Path, folder: Path, leave_out: tuple[str, ...] = ()) -> Path:
    for source in src.SOURCES.values():
        if source.name in leave_out:
            continue
        for relative in source.files:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes((sample_dir / relative).read_bytes())
    return folder


def test_missing_sources_stop_the_run_unless_allowed(sample_dir, tmp_path):
    folder = copy_sources(sample_dir, tmp_path / "src", leave_out=("quality", "asdiv"))
    with pytest.raises(MissingSourcesError, match=r"asdiv: missing asdiv/ASDiv.xml; quality: missing"):
        prepare(PrepareConfig(out=tmp_path / "out", source_dir=folder, **SMALL), log=lambda _: None)
    assert not (tmp_path / "out").exists()
    manifest = prepare(
        PrepareConfig(out=tmp_path / "out", source_dir=folder, allow_missing=True, **SMALL),
        log=lambda _: None,
    )
    assert set(manifest["missing_sources"]) == {"asdiv", "quality"}
    assert "quality" not in manifest["sources"] and len(manifest["sources"]) == 10
    assert abs(manifest["short_ratio"] - 0.45) < 0.1


def test_a_bad_record_fails_the_run_without_leaving_output_unless_skipped(sample_dir, tmp_path):
    folder = copy_sources(sample_dir, tmp_path / "src")
    write_jsonl(folder / "gsm8k/train.jsonl", [gsm8k_row(i) for i in range(40)] + [{"question": "q"}])
    with pytest.raises(DataFormatError, match=r"gsm8k/train.jsonl:41: field 'answer': missing"):
        prepare(PrepareConfig(out=tmp_path / "out", source_dir=folder, **SMALL), log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no OUT and no temporary folder left behind
    manifest = prepare(
        PrepareConfig(out=tmp_path / "out", source_dir=folder, skip_bad=True, **SMALL), log=lambda _: None
    )
    assert manifest["skipped_records"]["gsm8k"]["count"] == 1


def test_an_existing_folder_is_replaced_only_when_asked(prepared, sample_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(PrepareConfig(out=out, source_dir=sample_dir, **SMALL), log=lambda _: None)
    assert (out / "keep.txt").read_text() == "precious"
    prepare(PrepareConfig(out=out, source_dir=sample_dir, overwrite=True, **SMALL), log=lambda _: None)
    assert not (out / "keep.txt").exists() and read_manifest(out)["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failure_after_writing_started_leaves_no_output(sample_dir, tmp_path, monkeypatch):
    from cognate.data import prepare as prepare_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "_manifest", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(PrepareConfig(out=tmp_path / "out", source_dir=sample_dir, **SMALL), log=lambda _: None)
    assert os.listdir(tmp_path) == []


def test_folders_of_a_killed_prepare_are_removed_by_the_next_one(sample_dir, tmp_path):
    dead = _a_dead_pid()
    with subprocess.Popen(["sleep", "60"]) as alive:
        kept = tmp_path / f".out.tmp-{alive.pid}"  # another prepare, still running
        for folder in (tmp_path / f".out.tmp-{dead}", tmp_path / f".out.old-{dead}", kept):
            (folder / "shards").mkdir(parents=True)
        prepare(PrepareConfig(out=tmp_path / "out", source_dir=sample_dir, **SMALL), log=lambda _: None)
        alive.kill()
    assert sorted(os.listdir(tmp_path)) == sorted(["out", kept.name])


def _a_dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_config_errors_name_the_field(sample_dir, tmp_path):
    with pytest.raises(ConfigError, match="short_ratio"):
        PrepareConfig(out=tmp_path, builtin=True, short_ratio=1.5)
    with pytest.raises(ConfigError, match="long_len"):
        PrepareConfig(out=tmp_path, builtin=True, long_len=16384)
    with pytest.raises(ConfigError, match="exactly one of source_dir, builtin and hub"):
        PrepareConfig(out=tmp_path, builtin=True, source_dir=sample_dir)
    with pytest.raises(ConfigError, match="mix"):
        PrepareConfig(out=tmp_path, builtin=True, mix="shuffle")


@pytest.mark.slow
def test_builtin_synthetic_curriculum_from_the_command_line(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path / "out"), "--long-len", "1024"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    manifest = read_manifest(tmp_path / "out")
    assert manifest["synthetic"] is True and manifest["vocab_size"] <= 4096
    assert set(manifest["sources"]) == {
        "infill",
        "synthetic_arithmetic",
        "synthetic_code_edits",
        "synthetic_kv_recall",
    }
    assert abs(manifest["short_ratio"] - 0.45) < 0.02
    assert len(PackedDataset(tmp_path / "out", "validation", "long")) > 0


def test_a_document_longer_than_a_row_is_a_run_of_rows_with_its_id_and_index(builtin_data):
    """The built-in curriculum's long rows (256 tokens) hold documents longer than a row: each one's rows carry its
    id and indices 0, 1, ... in order, and their inputs are one text, ended by eos only in the last row."""
    data = PackedDataset(builtin_data, "train", "long")
    ids = data.documents[:, 0]
    long_ids = np.unique(ids[ids >= 0])
    assert len(long_ids) == read_manifest(builtin_data)["rows"]["train"]["long"]["multi_row_documents"] > 10
    eos = data.special.eos
    for doc in long_ids[:20]:
        rows = np.flatnonzero(ids == doc)
        assert data.documents[rows, 1].tolist() == list(range(len(rows))) and len(rows) >= 2
        inputs, targets = data.batch(rows)
        assert not (inputs[:-1] == eos).any() and (inputs[-1] == eos).any()
        assert (targets[:-1] != -100).all()  # every next-token pair inside the document is a target
        assert (targets[:-1, -1] == inputs[1:, 0]).all()  # a row's last target is the next row's first input


def test_a_folder_prepared_by_an_older_version_is_refused_with_one_line(builtin_data, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    manifest = read_manifest(builtin_data)
    del manifest["row_documents"]
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    args = ["train", "--preset", "tiny", "--data", str(old), "--out", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "re-run `cognate data prepare`" in err and "\n" not in err


def test_command_line_reports_bad_input_and_yaml_overrides(sample_dir, tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text(
        f"source_dir: {sample_dir}\nvocab_size: 600\nshort_len: 64\nlong_len: 256\nmix: repeat\n"
    )
    assert (
        main(["data", "prepare", "--config", str(config), "--out", str(tmp_path / "out"), "--seed", "5"]) == 0
    )
    manifest = read_manifest(tmp_path / "out")
    assert (
        manifest["mix"] == "repeat" and manifest["seed"] == 5 and manifest["sequence_lengths"]["long"] == 256
    )
    config.write_text("short_ratios: 0.5\n")
    assert main(["data", "prepare", "--config", str(config), "--out", str(tmp_path / "x")]) == 1
    assert "unknown settings ['short_ratios']" in capsys.readouterr().err


def test_tokenizer_train_command_writes_a_loadable_tokenizer(sample_dir, tmp_path, capsys):
    args = [
        "tokenizer",
        "train",
        "--source-dir",
        str(sample_dir),
        "--out",
        str(tmp_path / "tok"),
        "--vocab-size",
        "500",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocab_size"] == len(load_tokenizer(tmp_path / "tok")) == 500
    assert report["train_tokens_per_second"] > 0


# ------------------------------------------------------------------------------------------------ batch order


def test_sampler_covers_every_row_once_per_epoch_mixing_kinds():
    sampler = MixedBatchSampler({"short": 40, "long": 10}, {"short": 4, "long": 2}, seed=0)
    batches = [next(it) for it in [iter(sampler)] for _ in range(sampler.batches_per_epoch())]
    for kind, n in (("short", 40), ("long", 10)):
        rows = np.concatenate([r for k, r in batches if k == kind])
        assert sorted(rows.tolist()) == list(range(n))
    kinds = [k for k, _ in batches]
    assert kinds != sorted(kinds)  # interleaved, not all of one kind first


def test_sampler_resumes_exactly_from_its_state():
    def sampler():
        return MixedBatchSampler({"short": 30, "long": 9}, {"short": 4, "long": 2}, seed=7)

    stream = iter(sampler())
    expected = [next(stream) for _ in range(25)]  # crosses two epoch boundaries (11 batches per epoch)
    interrupted = sampler()
    stream = iter(interrupted)
    got = [next(stream) for _ in range(13)]
    resumed = sampler()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    stream = iter(resumed)
    got += [next(stream) for _ in range(12)]
    for (k1, r1), (k2, r2) in zip(expected, got, strict=True):
        assert k1 == k2 and np.array_equal(r1, r2)


def test_sampler_shards_batches_across_ranks():
    ranks = [MixedBatchSampler({"short": 40}, {"short": 4}, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [np.concatenate([next(it)[1] for it in [iter(s)] for _ in range(5)]) for s in ranks]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 40


def test_sampler_state_carries_over_to_another_number_of_processes():
    def sampler(rank=0, world_size=1, lanes=2):  # the same streams (lanes) for one process or two
        return MixedBatchSampler(
            {"short": 40}, {"short": 2}, seed=3, rank=rank, world_size=world_size, lanes=lanes
        )

    single = iter(sampler())
    order = [next(single)[1].tolist() for _ in range(12)]  # the global order
    pair = [sampler(rank, 2) for rank in range(2)]
    streams = [iter(s) for s in pair]
    for _ in range(3):  # 6 batches done by the two processes together
        for stream in streams:
            next(stream)
    state = json.loads(json.dumps(pair[0].state_dict()))
    assert state == pair[1].state_dict()
    alone = sampler()
    alone.load_state_dict(state)
    resumed = iter(alone)
    assert [next(resumed)[1].tolist() for _ in range(6)] == order[6:]
    next(resumed)
    with pytest.raises(ValueError, match="13 batches"):
        sampler(0, 2).load_state_dict(alone.state_dict())
    with pytest.raises(ValueError, match="streams"):  # another number of lanes lays the rows out differently
        sampler(lanes=4).load_state_dict(state)


def test_sampler_streams_walk_each_long_document_row_by_row_in_one_lane_and_batch_row():
    """Row b of a lane's successive batches continues the document row b of its previous batch held; documents
    stay whole and in order within an epoch, and every row is used once."""
    documents = np.array([0, 0, 0, -1, 1, 1, -1, -1, 2, 2, 2, 2, -1, 3, 3] * 4)
    documents = np.where(documents >= 0, documents + 10 * np.repeat(np.arange(4), 15), documents)
    sampler = MixedBatchSampler({"long": 60}, {"long": 2}, seed=5, documents={"long": documents}, lanes=3)
    batches = list(itertools.islice(sampler.iter_with_lanes(), sampler.batches_per_epoch()))
    assert sorted(np.concatenate([rows for _, rows, _ in batches]).tolist()) == list(range(60))
    assert [lane for _, _, lane in batches] == [g % 3 for g in range(len(batches))]
    streams: dict = {}
    for _, rows, lane in batches:
        for b, row in enumerate(rows):
            streams.setdefault((lane, b), []).append(int(row))
    for stream in streams.values():  # a document's rows are consecutive in one stream, unless a stream ends
        for earlier, later in itertools.pairwise(stream):
            same = documents[earlier] >= 0 and documents[earlier] == documents[later]
            assert (later == earlier + 1) if same else True
    assert sum(len(s) for s in streams.values()) == 60
    whole = [
        d
        for d in np.unique(documents[documents >= 0])
        if len({k for k, s in streams.items() if set(s) & set(np.flatnonzero(documents == d))}) == 1
    ]
    assert len(whole) >= 16 - 5  # only the 5 boundaries between the 6 streams can split a document


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_prepares_the_real_shared_data(tmp_path):
    manifest = prepare(PrepareConfig(out=tmp_path / "out", source_dir=SHARED_DATA), log=lambda _: None)
    assert list(manifest["sources"]) == list(src.SOURCE_ORDER)
    assert abs(manifest["short_ratio"] - 0.45) <= 0.02
    assert manifest["vocab_size"] == 32_000 and not manifest["missing_sources"]
    assert all(e["validation"]["documents"] > 0 for e in manifest["sources"].values())
    assert manifest["timings"]["total_seconds"] < 180
    # docs/data.md's figures for the real data: the ratio met to four places, 3.07 M training tokens (1.38 M in
    # 2,710 short rows, 1.69 M in 416 long ones: a long document starts its own rows), 0.17 M validation tokens,
    # padding under 1% of the train rows;
    # SVAMP, ASDiv and MBPP whole, GSM8K, CodeXGLUE and infill cut to the same token count; MBPP's test split out.
    assert f"{manifest['short_ratio']:.4f}" == "0.4500"
    rows = manifest["rows"]
    assert (rows["train"]["short"]["rows"], rows["train"]["long"]["rows"]) == (2_710, 416)
    assert [round(rows["train"][kind]["tokens"] / 1e6, 2) for kind in ("short", "long")] == [1.38, 1.69]
    assert round(sum(r["tokens"] for r in rows["validation"].values()) / 1e6, 2) == 0.17
    assert all(r["padding_fraction"] < 0.01 for r in rows["train"].values())
    sources = manifest["sources"]
    assert all(sources[name]["train"]["use_factor"] == 1.0 for name in ("svamp", "asdiv", "mbpp"))
    cut = {name: sources[name]["train"] for name in ("gsm8k", "codexglue_refinement", "infill")}
    tokens = [entry["tokens"] for entry in cut.values()]
    assert max(tokens) - min(tokens) < 0.001 * max(tokens) and all(e["use_factor"] < 1 for e in cut.values())
    assert sources["mbpp"]["excluded_records"] == 500  # task ids 11-510
