"""`cognate data prepare` end to end on small files, the prepared folder's reader, and the batch order."""

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
    def sampler(rank=0, world_size=1):
        return MixedBatchSampler({"short": 40}, {"short": 2}, seed=3, rank=rank, world_size=world_size)

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
    # 2,710 short rows, 1.69 M in 415 long ones), 0.17 M validation tokens, padding under 1% of the train rows;
    # SVAMP, ASDiv and MBPP whole, GSM8K, CodeXGLUE and infill cut to the same token count; MBPP's test split out.
    assert f"{manifest['short_ratio']:.4f}" == "0.4500"
    rows = manifest["rows"]
    assert (rows["train"]["short"]["rows"], rows["train"]["long"]["rows"]) == (2_710, 415)
    assert [round(rows["train"][kind]["tokens"] / 1e6, 2) for kind in ("short", "long")] == [1.38, 1.69]
    assert round(sum(r["tokens"] for r in rows["validation"].values()) / 1e6, 2) == 0.17
    assert all(r["padding_fraction"] < 0.01 for r in rows["train"].values())
    sources = manifest["sources"]
    assert all(sources[name]["train"]["use_factor"] == 1.0 for name in ("svamp", "asdiv", "mbpp"))
    cut = {name: sources[name]["train"] for name in ("gsm8k", "codexglue_refinement", "infill")}
    tokens = [entry["tokens"] for entry in cut.values()]
    assert max(tokens) - min(tokens) < 0.001 * max(tokens) and all(e["use_factor"] < 1 for e in cut.values())
    assert sources["mbpp"]["excluded_records"] == 500  # task ids 11-510
