"""The training loop's promises: exact resume after SIGKILL, loadable checkpoints at any moment, the non-finite
guard, early stopping, the run-folder guard, and torchrun (DDP on gloo) matching one process."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cognate.model.config import get_preset
from cognate.train import checkpoint, trainer
from cognate.train.carry import CarriedMemory
from cognate.train.config import TrainConfig
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed

# A very small model so each step takes milliseconds; short and long rows both present, memory on the long ones.
MODEL = dict(
    d_model=32,
    n_heads=2,
    n_layers=1,
    ffn_hidden=64,
    t_train=2,
    t_infer=2,
    grad_steps=1,
    mem_dim=16,
    mem_capacity=8,
    mem_topk=2,
    mem_chunk_size=32,
    max_seq_len=256,
)
TRAIN = dict(
    batch_size=2,
    grad_accum=2,
    max_tokens=100_000,
    warmup_tokens=0,
    log_interval=1,
    eval_interval=4,
    eval_batches=2,
    checkpoint_interval=1,
    bf16=False,
    optimizer="mugrokfast",
    grokfast_warmup_steps=2,
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(builtin_data) -> Path:
    return builtin_data


def model_config(data_dir: Path):
    vocab = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    return get_preset("tiny").replace(vocab_size=vocab, **MODEL)


def cli_args(data_dir: Path, out: Path, steps: int, **extra) -> list[str]:
    settings = {**MODEL, **TRAIN, "max_steps": steps, **extra}
    args = [
        sys.executable,
        "-m",
        "cognate.cli",
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data_dir),
        "--out",
        str(out),
    ]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


# `python -c` program: the CLI, with every training micro-batch's input ids appended as one JSON line to the
# file $COGNATE_TEST_BATCH_LOG.
LOG_TRAINING_BATCHES = """
import json, os, sys
import torch
from cognate.cli import main
from cognate.train import trainer

forward = trainer.CognateModel.forward

def logged(self, input_ids, *args, **kwargs):
    if self.training and torch.is_grad_enabled():  # not the checkpoint's no_grad soundness check
        with open(os.environ["COGNATE_TEST_BATCH_LOG"], "a") as log:
            log.write(json.dumps(input_ids.tolist()) + "\\n")
    return forward(self, input_ids, *args, **kwargs)

trainer.CognateModel.forward = logged
sys.exit(main(sys.argv[1:]))
"""


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def torchrun_command(cli: list[str]) -> list[str]:
    """`cli` (a `cli_args` command) run by 2 processes under the torchrun of this interpreter, on a free port: a
    `torchrun` on PATH may belong to another environment, or be absent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "cognate.cli",
        *cli[3:],
    ]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_then_resume_continues_from_the_checkpoint_with_the_same_per_step_losses(data_dir, tmp_path):
    steps = 10
    straight = tmp_path / "straight"
    subprocess.run(cli_args(data_dir, straight, 2 * steps), check=True, env=ENV, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        cli_args(data_dir, killed, 2 * steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for_step(killed, steps, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = checkpoint.load(killed / trainer.CHECKPOINT)["progress"]["step"]
    assert steps - 1 <= resumed_from < 2 * steps  # the log line of step N may precede its checkpoint

    # Training is deterministic, so a resume that silently restarted from scratch would log the same losses: the
    # micro-batches it trains on tell them apart. The resume runs the CLI in a fresh process, as the other two runs
    # do (this process's compiled kernels may round differently), with a forward that logs each training batch.
    trained_on = tmp_path / "trained_on.jsonl"
    subprocess.run(
        [sys.executable, "-c", LOG_TRAINING_BATCHES, *cli_args(data_dir, killed, 2 * steps)[3:], "--resume"],
        check=True,
        env={**ENV, "COGNATE_TEST_BATCH_LOG": str(trained_on)},
        capture_output=True,
    )
    trained_on = [json.loads(line) for line in trained_on.read_text().splitlines()]

    # The micro-batches of steps resumed_from + 1 ... 2·steps of an uninterrupted run, in order, and no others.
    order = TrainingData(
        data_dir,
        batch_size=TRAIN["batch_size"],
        seed=TrainConfig().seed,
        dist=_single(),
        grad_accum=TRAIN["grad_accum"],
    )
    expected = [order.next_batch()[0].tolist() for _ in range(2 * steps * TRAIN["grad_accum"])]
    assert trained_on == expected[resumed_from * TRAIN["grad_accum"] :]
    assert losses(killed) == losses(straight)  # identical, not merely close: same bits on the same CPU
    assert sorted(losses(killed)) == list(range(1, 2 * steps + 1))


def test_a_resume_restores_the_memory_a_long_document_carries_into_its_next_row(
    data_dir, tmp_path, monkeypatch
):
    """The checkpoint holds each stream's carried memory; resumed from a step where a document continues in the
    next update, the run logs the losses of the uninterrupted one, bit for bit."""
    config = TrainConfig(**{**TRAIN, "max_steps": 8, "eval_interval": 100})
    saved_at, save = {}, checkpoint.save_atomic

    def save_and_keep(state, path):  # a copy of the first checkpoint (after step 2) that carries memory
        save(state, path)
        first = path.name == trainer.CHECKPOINT and not saved_at and state["progress"]["step"] >= 2
        if first and state["carried_memory"]:
            saved_at["step"] = state["progress"]["step"]
            save(state, tmp_path / "kept.pt")

    monkeypatch.setattr(checkpoint, "save_atomic", save_and_keep)
    trainer.train(model_config(data_dir), config, data_dir, tmp_path / "straight", _single())
    monkeypatch.setattr(checkpoint, "save_atomic", save)
    assert saved_at, "no checkpoint carried memory: the test data has no document spanning rows"
    kept = checkpoint.load(tmp_path / "kept.pt")
    for entry in kept["carried_memory"].values():
        assert (entry["documents"][:, 0] >= 0).any() and entry["strength"].gt(0).any()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / trainer.RUN_CONFIG).write_text((tmp_path / "straight" / trainer.RUN_CONFIG).read_text())
    (tmp_path / "kept.pt").rename(resumed / trainer.CHECKPOINT)
    trainer.train(model_config(data_dir), config, data_dir, resumed, _single(), resume=True)
    straight = losses(tmp_path / "straight")
    assert sorted(losses(resumed)) == list(range(saved_at["step"] + 1, 9))
    assert {step: straight[step] for step in losses(resumed)} == losses(resumed)


@pytest.mark.slow
def test_a_kill_at_any_moment_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        cli_args(data_dir, run, 1000), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for_step(run, 2, process)
    for delay in (0.013, 0.029, 0.047, 0.071, 0.101):  # land inside and between checkpoint writes
        time.sleep(delay)
        state = checkpoint.load(run / trainer.CHECKPOINT)
        assert state["progress"]["step"] >= 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = checkpoint.load(run / trainer.CHECKPOINT)
    assert {"model", "optimizer", "data", "rng", "progress"} <= set(state)
    assert (run / trainer.CHECKPOINT).stat().st_size > 0


def test_an_injected_nan_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = trainer.CognateModel.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += self.training
        if self.training and calls["n"] == 3:  # a micro-batch of the second update
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.CognateModel, "forward", forward)
    config = TrainConfig(**{**TRAIN, "max_steps": 4, "checkpoint_interval": 4})
    summary = trainer.train(model_config(data_dir), config, data_dir, tmp_path / "run", _single())
    assert summary["skipped_steps"] == 1
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1
    assert all(r["loss"] is not None for r in rows if r["step"] != 2)


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    original = trainer.CognateModel.forward
    state = {"steps": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():  # a training micro-batch, not the checkpoint's probe
            state["steps"] += 1
            if state["steps"] > 4:  # two good updates (2 micro-batches each), then only NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.CognateModel, "forward", forward)
    config = TrainConfig(**{**TRAIN, "max_steps": 20, "max_nonfinite_steps": 3, "checkpoint_interval": 2})
    with pytest.raises(trainer.NonFiniteTrainingError, match="3 consecutive steps"):
        trainer.train(model_config(data_dir), config, data_dir, tmp_path / "run", _single())
    saved = checkpoint.load(tmp_path / "run" / trainer.CHECKPOINT)
    assert saved["progress"]["step"] == 4  # the last checkpoint written, with the 2 good updates
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_early_stopping_triggers_on_a_plateau_and_keeps_the_best_model(data_dir, tmp_path):
    # lr 0: the validation loss cannot improve after the first validation.
    config = TrainConfig(
        **{
            **TRAIN,
            "max_steps": 100,
            "eval_interval": 1,
            "patience": 2,
            "lr": 0.0,
            "muon_lr": 0.0,
            "optimizer": "adamw",
        }
    )
    summary = trainer.train(model_config(data_dir), config, data_dir, tmp_path / "run", _single())
    assert summary["stop_reason"].startswith("early stopping")
    assert summary["steps"] == 3  # best at the first validation, then 2 without improvement
    best = checkpoint.load(tmp_path / "run" / trainer.BEST_MODEL)
    assert best["step"] == 1 and best["val_loss"] == pytest.approx(summary["best_val_loss"])


def test_validation_writes_greedy_samples_of_the_prompts(data_dir, tmp_path):
    config = TrainConfig(
        **{
            **TRAIN,
            "max_steps": 2,
            "eval_interval": 2,
            "sample_prompts": ("Problem: 2 + 2?",),
            "sample_tokens": 4,
        }
    )
    trainer.train(model_config(data_dir), config, data_dir, tmp_path / "run", _single())
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(2, "Problem: 2 + 2?")]
    assert isinstance(rows[0]["completion"], str) and rows[0]["completion"]


def test_a_run_folder_with_another_config_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(**{**TRAIN, "max_steps": 1})
    trainer.train(model_config(data_dir), config, data_dir, run, _single())
    with pytest.raises(trainer.RunFolderError, match="differs in: train"):
        trainer.train(model_config(data_dir), config.replace(seed=7), data_dir, run, _single())
    with pytest.raises(trainer.RunFolderError, match="--resume"):
        trainer.train(model_config(data_dir), config, data_dir, run, _single())
    trainer.train(model_config(data_dir), config.replace(seed=7), data_dir, run, _single(), overwrite=True)


@pytest.mark.slow
def test_an_update_that_breaks_the_weights_never_overwrites_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch, capsys
):
    # The third update is finite (loss and gradient norm were computed before it) but leaves weights of 1e30, as
    # lr=1e30 does: every later loss is non-finite.
    build = trainer.build_optimizer

    def build_breaking(model, config):
        optimizer = build(model, config)
        step, calls = optimizer.step, {"n": 0}

        def breaking_step(*args, **kwargs):
            step(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.fill_(1e30)

        optimizer.step = breaking_step
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_breaking)
    config = TrainConfig(**{**TRAIN, "max_steps": 8, "max_nonfinite_steps": 3, "checkpoint_interval": 1})
    run = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteTrainingError) as raised:
        trainer.train(model_config(data_dir), config, data_dir, run, _single())
    assert f"{run / trainer.CHECKPOINT} (step 2)" in str(raised.value)
    assert (
        f"step 3: the weights, or the loss at them, are not finite; not saving them over {run / trainer.CHECKPOINT}"
        in capsys.readouterr().out
    )
    saved = checkpoint.load(run / trainer.CHECKPOINT)
    assert saved["progress"]["step"] == 2
    assert all(t.abs().max() < 1e3 for t in saved["model"].values() if t.is_floating_point())

    monkeypatch.setattr(trainer, "build_optimizer", build)
    summary = trainer.train(model_config(data_dir), config, data_dir, run, _single(), resume=True)
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["best_val_loss"])


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    steps = 4
    single = tmp_path / "single"
    subprocess.run(
        cli_args(data_dir, single, steps, grad_accum=4, bf16=False), check=True, env=ENV, capture_output=True
    )
    ddp = tmp_path / "ddp"
    command = torchrun_command(cli_args(data_dir, ddp, steps, grad_accum=2, bf16=False))
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(single), losses(ddp)
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_resume_after_a_kill_where_they_stopped(data_dir, tmp_path):
    # Both ranks take rank 0's decision to resume and its data position: the resumed 2-process run logs every step
    # once and matches one process over the same global batch.
    steps = 8
    single = tmp_path / "single"
    subprocess.run(cli_args(data_dir, single, steps, grad_accum=4), check=True, env=ENV, capture_output=True)
    ddp = tmp_path / "ddp"

    def torchrun(*extra: str) -> list[str]:
        return torchrun_command([*cli_args(data_dir, ddp, steps, grad_accum=2), *extra])

    process = subprocess.Popen(
        torchrun(), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    wait_for_step(ddp, steps // 2, process)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
    process.wait()
    resumed_from = checkpoint.load(ddp / trainer.CHECKPOINT)["progress"]["step"]
    assert 1 <= resumed_from < steps
    result = subprocess.run(torchrun("--resume"), env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(single), losses(ddp)
    assert sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5)


def _single() -> Distributed:
    return Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def test_auto_precision_is_measured_recorded_and_kept_by_a_resumed_run(
    data_dir, tmp_path, monkeypatch, capsys
):
    from cognate.train import precision

    def fake_peaks(bf16_peak: float, fp32_peak: float) -> None:
        by_dtype = {torch.bfloat16: bf16_peak, torch.float32: fp32_peak}
        monkeypatch.setattr(precision, "measure_matmul_flops", lambda dtype, device: by_dtype[dtype])

    run = tmp_path / "run"
    config = TrainConfig(**{**TRAIN, "bf16": "auto", "max_steps": 2, "checkpoint_interval": 2})
    fake_peaks(0.17e12, 0.33e12)  # bf16 matmuls slower than fp32: a CPU without AMX
    summary = trainer.train(model_config(data_dir), config, data_dir, run, _single())
    assert "precision fp32 (auto; matmul peaks bf16 0.170, fp32 0.330 TFLOP/s)" in capsys.readouterr().out
    recorded = json.loads((run / trainer.RUN_CONFIG).read_text())["precision"]
    assert recorded["precision"] == summary["precision"]["precision"] == "fp32"
    assert summary["peak_flops"] == 0.33e12  # MFU against the peak of the precision in use

    # Resumed on a machine where bf16 measures faster, the run continues in the precision it started with.
    fake_peaks(0.87e12, 0.20e12)
    resumed = trainer.train(model_config(data_dir), config, data_dir, run, _single(), resume=True)
    assert resumed["precision"]["precision"] == "fp32" and resumed["steps"] == 2
    # Its peaks are this machine's, measured anew (MFU against the fp32 peak here), and it is still "auto".
    assert resumed["precision"]["setting"] == "auto" and resumed["peak_flops"] == 0.20e12
    assert (resumed["precision"]["bf16_peak_flops"], resumed["precision"]["fp32_peak_flops"]) == (
        0.87e12,
        0.20e12,
    )
    # A fresh run there takes bf16.
    fresh = trainer.train(model_config(data_dir), config, data_dir, tmp_path / "fresh", _single())
    assert fresh["precision"]["precision"] == "bf16" and fresh["peak_flops"] == 0.87e12


def test_auto_precision_takes_bf16_only_where_every_process_measured_it_faster(monkeypatch):
    """docs/speed.md: under DDP every process measures, and bf16 is used only if all agree. Another process that
    measured fp32 faster is simulated by `all_true`."""
    from types import SimpleNamespace

    from cognate.train import precision

    peaks = {torch.bfloat16: 0.87e12, torch.float32: 0.20e12}  # bf16 clearly faster here
    monkeypatch.setattr(precision, "measure_matmul_flops", lambda dtype, device: peaks[dtype])
    alone = SimpleNamespace(device=torch.device("cpu"), all_true=lambda flag: flag)
    outvoted = SimpleNamespace(device=torch.device("cpu"), all_true=lambda flag: False)
    assert trainer._run_precision("auto", None, alone).bf16 is True
    chosen = trainer._run_precision("auto", None, outvoted)
    assert chosen.bf16 is False and chosen.peak_flops == 0.20e12 and chosen.setting == "auto"


def test_validation_reports_the_loss_after_each_step_and_the_spread_of_halting(data_dir):
    """What each refinement step adds (val_loss_step_t, the last one being val_loss) and the halting statistics
    over the scored tokens, as a direct evaluation of the same rows gives them."""
    from cognate.model.model import CognateModel
    from cognate.train.data import TrainingData

    torch.manual_seed(0)
    model = CognateModel(model_config(data_dir))
    with torch.no_grad():  # an untrained halting head that sends tokens to different steps
        model.halting.out.weight.normal_(std=3.0)
        model.halting.out.bias.zero_()
    dist = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    data = TrainingData(data_dir, batch_size=2, seed=0, dist=dist)
    row = trainer.validate(model, data, 3, contextlib.nullcontext, dist)
    assert (
        row["val_loss_step_2"] == pytest.approx(row["val_loss"]) and row["val_loss_step_1"] != row["val_loss"]
    )
    model.eval()
    carried, steps = CarriedMemory(), []
    with torch.no_grad():
        for batch in data.validation_batches(3):
            memory = carried.state_for(batch.stream, batch.documents)
            out = model(batch.input_ids, targets=batch.targets, memory_state=memory)
            carried.update(batch.stream, out.memory_state, batch.documents)
            steps.append(out.act["steps"][batch.targets != -100])
    steps = torch.cat(steps).double()
    assert row["val_act_mean_steps"] == pytest.approx(steps.mean().item())
    assert row["val_act_var_steps"] == pytest.approx(steps.var(unbiased=False).item()) and steps.var() > 0


class _Killed(Exception):
    """Stands in for a SIGKILL: raised out of the training loop at a chosen moment."""


def _kill_after_logging(monkeypatch, step: int) -> None:
    """The run dies right after writing the log row of `step` (before that step's checkpoint, if it has one)."""
    log = trainer.MetricsLog.log

    def log_then_die(self, row):
        log(self, row)
        if row["step"] == step:
            raise _Killed

    monkeypatch.setattr(trainer.MetricsLog, "log", log_then_die)


def _record_training_steps(monkeypatch) -> list[dict]:
    """Each training micro-batch's input ids and the RNG state it starts from, as the model sees them."""
    forward, seen = trainer.CognateModel.forward, []

    def recording(self, input_ids, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # not the checkpoint's no_grad soundness check
            seen.append({"input_ids": input_ids.tolist(), "rng": torch.get_rng_state().tolist()})
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(trainer.CognateModel, "forward", recording)
    return seen


def test_an_in_process_resume_continues_where_the_checkpoint_stopped_as_an_uninterrupted_run_does(
    data_dir, tmp_path, monkeypatch
):
    """A run killed between checkpoints and resumed trains on the same micro-batches, from the same RNG state
    (dropout draws from it), with the same optimizer state and schedule position, as an uninterrupted run, and
    its log, summary, best model and final checkpoint are that run's. A resume that silently restarted from
    scratch, or restored only part of the state, gives other batches, losses or weights. Writing checkpoints
    changes nothing either (their soundness check runs the model without drawing from the RNG), and the elapsed
    time adds up over the two invocations."""
    cfg = model_config(data_dir).replace(dropout=0.1)
    config = TrainConfig(**{**TRAIN, "max_steps": 8, "checkpoint_interval": 3, "eval_interval": 2})
    seen = _record_training_steps(monkeypatch)
    straight = trainer.train(cfg, config, data_dir, tmp_path / "straight", _single())
    straight_steps = list(seen)
    trainer.train(cfg, config.replace(checkpoint_interval=1), data_dir, tmp_path / "every_step", _single())
    assert losses(tmp_path / "every_step") == losses(tmp_path / "straight")

    seen.clear()
    run = tmp_path / "run"
    started = time.perf_counter()
    with monkeypatch.context() as patch:
        _kill_after_logging(patch, 5)  # checkpoint at step 3; steps 4 and 5 are lost
        with pytest.raises(_Killed):
            trainer.train(cfg, config, data_dir, run, _single())
    killed_after = time.perf_counter() - started
    saved = checkpoint.load(run / trainer.CHECKPOINT)["progress"]
    assert saved["step"] == 3 and 0 < saved["elapsed_s"] < killed_after
    seen.clear()
    started = time.perf_counter()
    resumed = trainer.train(cfg, config, data_dir, run, _single(), resume=True)
    resumed_for = time.perf_counter() - started

    assert seen == straight_steps[3 * TRAIN["grad_accum"] :]  # batches and RNG of steps 4..8, in order
    assert losses(run) == losses(tmp_path / "straight") and sorted(losses(run)) == list(range(1, 9))
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(saved["elapsed_s"] < e < saved["elapsed_s"] + resumed_for for e in elapsed[3:])
    assert saved["elapsed_s"] < resumed["wall_time_s"] < saved["elapsed_s"] + resumed_for
    assert {k: v for k, v in resumed.items() if k != "wall_time_s"} == {
        k: v for k, v in straight.items() if k != "wall_time_s"
    }
    for name in (trainer.CHECKPOINT, trainer.BEST_MODEL):
        ours, theirs = checkpoint.load(run / name), checkpoint.load(tmp_path / "straight" / name)
        assert_same_state(ours, theirs, skip={"elapsed_s"})


def assert_same_state(ours, theirs, skip=frozenset(), path="state") -> None:
    """Two nested checkpoint states hold the same values, tensors bit for bit (keys in `skip` not compared)."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), path
        for key in ours:
            if key not in skip:
                assert_same_state(ours[key], theirs[key], skip, f"{path}.{key}")
    elif isinstance(ours, list | tuple):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_state(a, b, skip, f"{path}[{i}]")
    elif isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), path
    else:
        assert ours == theirs, path


def test_a_resume_brings_a_new_time_budget_but_not_past_another_stop(data_dir, tmp_path):
    """A run stopped by its time budget continues when resumed (a new invocation, a new budget); one stopped by
    early stopping stays stopped; resuming a folder without a checkpoint starts the run."""
    timed = TrainConfig(**{**TRAIN, "max_steps": 6, "max_minutes": 0.0})  # out of time after every step
    run = tmp_path / "timed"
    first = trainer.train(model_config(data_dir), timed, data_dir, run, _single(), resume=True)
    assert first["stop_reason"] == "time budget reached" and first["steps"] == 1
    second = trainer.train(model_config(data_dir), timed, data_dir, run, _single(), resume=True)
    assert second["stop_reason"] == "time budget reached" and second["steps"] == 2

    plateau = TrainConfig(
        **{**TRAIN, "max_steps": 6, "eval_interval": 1, "patience": 1, "lr": 0.0, "muon_lr": 0.0}
    )
    run = tmp_path / "plateau"
    stopped = trainer.train(model_config(data_dir), plateau, data_dir, run, _single())
    assert stopped["stop_reason"].startswith("early stopping") and stopped["steps"] == 2
    again = trainer.train(model_config(data_dir), plateau, data_dir, run, _single(), resume=True)
    assert again["stop_reason"] == stopped["stop_reason"] and again["steps"] == 2


def test_rank_0_decides_whether_to_resume_and_a_rank_that_cannot_see_its_checkpoint_stops(tmp_path):
    """docs/pipeline.md: on --resume rank 0 decides and broadcasts; a rank that cannot see the checkpoint stops
    the run with an error saying the folder must be shared. Another rank is simulated: `from_main` gives rank 0's
    view, `all_true` the other ranks' (rank 0's own is true whenever it decided to resume)."""
    from types import SimpleNamespace

    with_checkpoint, without = tmp_path / "with", tmp_path / "without"
    with_checkpoint.mkdir(), without.mkdir()
    checkpoint.save_atomic({"step": 1}, with_checkpoint / trainer.CHECKPOINT)

    def rank(main_sees_one: bool):
        return SimpleNamespace(from_main=lambda flag: main_sees_one, all_true=lambda flag: flag)

    assert trainer._checkpoint_to_resume(with_checkpoint, rank(True)) is True
    assert trainer._checkpoint_to_resume(without, rank(False)) is False
    assert (
        trainer._checkpoint_to_resume(with_checkpoint, rank(False)) is False
    )  # rank 0 has none: start afresh
    with pytest.raises(trainer.RunFolderError) as stopped:
        trainer._checkpoint_to_resume(without, rank(True))
    assert str(stopped.value) == (
        f"rank 0 resumes from {without / trainer.CHECKPOINT} but another rank cannot see it: "
        "the run folder must be on a file system every node shares"
    )


def test_a_run_folder_compares_every_setting_as_stored_but_not_the_measured_precision(tmp_path):
    """A setting only one of the two configs has is a difference; a tuple equals the list it is stored as; the
    measured precision may differ (another machine); a folder without a checkpoint needs no --resume."""
    run = tmp_path / "runs" / "new" / "run"  # parent folders made as needed
    settings = {"model": {"d": 8}, "train": {"prompts": ("a", "b")}, "precision": {"bf16": False}}
    trainer.prepare_run_dir(run, settings, resume=False, overwrite=False)
    trainer.prepare_run_dir(run, {**settings, "precision": {"bf16": True}}, resume=False, overwrite=False)
    with pytest.raises(trainer.RunFolderError, match=r"differs in: data\)"):
        trainer.prepare_run_dir(run, {**settings, "data": "/elsewhere"}, resume=True, overwrite=False)
    without_model = {k: v for k, v in settings.items() if k != "model"}
    with pytest.raises(trainer.RunFolderError) as refused:
        trainer.prepare_run_dir(run, {**without_model, "data": "/elsewhere"}, resume=True, overwrite=False)
    assert str(refused.value) == (
        f"{run} holds a run with a different config (differs in: data, model); "
        "pass --overwrite to replace it or choose another folder"
    )
    stored = json.loads((run / trainer.RUN_CONFIG).read_text())
    assert stored == {"model": {"d": 8}, "train": {"prompts": ["a", "b"]}, "precision": {"bf16": True}}
