"""The training loop: gradient accumulation, clipping, token-scheduled learning rate, validation with early
stopping, a non-finite guard, atomic checkpoints with exact resume, and DDP under torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from cognate.data.tokenizer import load_tokenizer
from cognate.model.config import CognateConfig, ConfigError
from cognate.model.model import CognateModel
from cognate.train import checkpoint
from cognate.train.carry import CarriedMemory, check_carry
from cognate.train.config import TrainConfig
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed
from cognate.train.metrics import MetricsLog, format_duration, truncate_after_step
from cognate.train.optimizer import build_optimizer
from cognate.train.precision import Precision, autocast_for, resolve_precision
from cognate.train.schedule import lr_multiplier
from cognate.train.throughput import flops_per_token

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pt"
RUN_CONFIG = "run_config.json"
SAMPLES = "samples.jsonl"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient norm."""


class RunFolderError(RuntimeError):
    """The run folder holds a different run."""


@dataclass
class Progress:
    """Everything about where a run stands, besides model/optimizer/data state. Saved in every checkpoint."""

    step: int = 0  # optimizer updates taken (skipped steps included)
    tokens: int = 0  # training tokens consumed, over all processes
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    elapsed_s: float = 0.0
    stop_reason: str | None = None


# run_config.json entries measured on the machine rather than chosen: a resume may see other values.
MEASURED_KEYS = frozenset({"precision"})


def prepare_run_dir(run_dir: Path, run_config: dict, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two different runs in one folder unless told to resume (same config) or overwrite."""
    path = run_dir / RUN_CONFIG
    run_config = json.loads(json.dumps(run_config))  # compare as stored: tuples become lists
    if path.exists() and not overwrite:
        existing = json.loads(path.read_text())
        # The measured precision is a fact about the machine, not the run's settings (which include bf16).
        changed = sorted(
            k
            for k in set(existing) | set(run_config)
            if k not in MEASURED_KEYS and existing.get(k) != run_config.get(k)
        )
        if changed:
            raise RunFolderError(
                f"{run_dir} holds a run with a different config (differs in: {', '.join(changed)}); "
                "pass --overwrite to replace it or choose another folder"
            )
        if not resume and (run_dir / CHECKPOINT).exists():
            raise RunFolderError(
                f"{run_dir} already holds this run; pass --resume to continue or --overwrite"
            )
    if overwrite and path.exists():  # only ever delete what is recognisably a run folder
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_temporaries(run_dir)  # a kill during a checkpoint write leaves its temporary file
    path.write_text(json.dumps(run_config, indent=2, sort_keys=True))


def train(
    model_config: CognateConfig,
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    dist: Distributed,
    *,
    resume: bool = False,
    overwrite: bool = False,
    wandb_mode: str = "disabled",
    tensorboard: bool = False,
) -> dict:
    """Train one model; returns the final progress and validation figures (also written to RUN/summary.json)."""
    run_dir = Path(run_dir)
    precision = _run_precision(config.bf16, run_dir if resume else None, dist)
    run_config = {
        "model": model_config.to_dict(),
        "train": config.to_dict(),
        "data": str(Path(data_dir).resolve()),
        "precision": precision.to_dict(),
    }
    if dist.is_main:
        prepare_run_dir(run_dir, run_config, resume=resume, overwrite=overwrite)
        print(precision.describe(), flush=True)
    dist.barrier()

    torch.manual_seed(config.seed)  # same initialisation on every rank
    model = CognateModel(model_config.replace(gradient_checkpointing=config.gradient_checkpointing)).to(
        dist.device
    )
    if config.init_from is not None:
        model.load_state_dict(load_file(config.init_from, device=str(dist.device)))
    optimizer = build_optimizer(model, config)
    if config.init_optimizer_from is not None:
        _continue_optimizer_state(optimizer, Path(config.init_optimizer_from))
    data = TrainingData(
        data_dir, batch_size=config.batch_size, seed=config.seed, dist=dist, grad_accum=config.grad_accum
    )
    check_carry(model_config, data.seq_lens, data.multi_row)
    carried = CarriedMemory()  # each stream's memory, from one segment of a long document to the next
    progress = Progress()
    if resume and _checkpoint_to_resume(run_dir, dist):
        progress = _restore(run_dir / CHECKPOINT, model, optimizer, data, carried, dist)
        if dist.is_main and (run_dir / SAMPLES).exists():
            truncate_after_step(run_dir / SAMPLES, progress.step)
    # Some parameters can sit idle in one rank's micro-batch and not in another's (memory off, a halting head
    # that only runs on steps < t_infer). With find_unused_parameters=False the ranks then reduce different
    # buckets: a 2-process run aborted in gloo ("Received data size doesn't match expected size").
    ddp_model = DistributedDataParallel(model, find_unused_parameters=True) if dist.enabled else model
    forward = torch.compile(ddp_model) if config.compile else ddp_model

    total_steps = _total_steps(config, data.tokens_per_micro_batch)
    peak_flops = precision.peak_flops
    flops = flops_per_token(model, data.seq_lens["short"])
    log = (
        MetricsLog(
            run_dir,
            total_steps,
            run_config,
            resume_step=progress.step,
            wandb_mode=wandb_mode,
            tensorboard=tensorboard,
        )
        if dist.is_main
        else None
    )
    autocast = autocast_for(dist.device, precision.bf16)
    tokenizer = load_tokenizer(data_dir) if config.sample_prompts else None
    start_time, start_step, start_tokens = time.perf_counter(), progress.step, progress.tokens
    last_good_step = progress.step if progress.step else None  # the step of the checkpoint on disk, if any
    window = _Window()

    try:
        while (
            progress.step < total_steps
            and progress.tokens < config.max_tokens
            and progress.stop_reason is None
        ):
            multiplier = lr_multiplier(
                progress.tokens, config.warmup_tokens, config.max_tokens, config.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * multiplier
            step_start = time.perf_counter()
            loss, act, tokens = _accumulate(forward, model, data, carried, config.grad_accum, autocast, dist)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm).item()
            finite = dist.all_true(math.isfinite(loss) and math.isfinite(grad_norm))
            if finite:
                optimizer.step()
                progress.consecutive_skipped = 0
            else:
                carried.clear()  # what a non-finite step carried must not reach the next segments
                progress.skipped_steps += 1
                progress.consecutive_skipped += 1
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += tokens
            window.add(loss if finite else None, grad_norm, act, tokens, time.perf_counter() - step_start)
            if log is not None:
                log.advance()
            if progress.consecutive_skipped >= config.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"{progress.consecutive_skipped} consecutive steps had a non-finite loss or gradient norm "
                    f"(last loss {loss}, grad norm {grad_norm}); {_last_good(run_dir, last_good_step)}"
                )

            row = None
            last = progress.step >= total_steps or progress.tokens >= config.max_tokens
            if progress.step % config.log_interval == 0 or last:
                elapsed = time.perf_counter() - start_time
                rate = (progress.tokens - start_tokens) / max(elapsed, 1e-9)
                remaining = (total_steps - progress.step) * elapsed / max(progress.step - start_step, 1)
                row = window.row(
                    progress,
                    _adamw_lr(optimizer),
                    rate,
                    rate * flops / (peak_flops * dist.world_size),  # every process has that peak
                    format_duration(remaining),
                )
            if progress.step % config.eval_interval == 0 or last:
                row = row or {"step": progress.step, "tokens": progress.tokens}
                row.update(validate(model, data, config.eval_batches, autocast, dist))
                _early_stopping(progress, row["val_loss"], config, model, run_dir, dist)
                if dist.is_main and config.sample_prompts:
                    _write_samples(model, tokenizer, config, progress.step, run_dir / SAMPLES)
            if row is not None and log is not None:
                row["elapsed_s"] = progress.elapsed_s + time.perf_counter() - start_time  # over resumes
                log.log(row)
            out_of_time = config.max_minutes is not None and (
                time.perf_counter() - start_time
                > 60 * config.max_minutes  # per invocation: a resume gets a new one
            )
            if dist.all_true(out_of_time) and progress.stop_reason is None:
                progress.stop_reason = "time budget reached"
            if progress.step % config.checkpoint_interval == 0 or progress.stop_reason or last:
                saved = _save(run_dir, model, optimizer, data, carried, progress, start_time, dist, autocast)
                last_good_step = progress.step if saved else last_good_step
        progress.stop_reason = progress.stop_reason or (
            "token budget reached" if progress.tokens >= config.max_tokens else "step limit reached"
        )
        progress.elapsed_s += time.perf_counter() - start_time
    finally:
        if log is not None:
            log.close()
    summary = {
        "stop_reason": progress.stop_reason,
        "steps": progress.step,
        "tokens": progress.tokens,
        "skipped_steps": progress.skipped_steps,
        "best_val_loss": progress.best_val_loss,
        "wall_time_s": progress.elapsed_s,
        "peak_flops": peak_flops,
        "precision": precision.to_dict(),
        "flops_per_token": flops,
    }
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _adamw_lr(optimizer) -> float:
    """The learning rate of the AdamW group (embeddings, head, norms): the one line of the log shows."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g.get("name") == "adamw"), groups[0]["lr"])


def _total_steps(config: TrainConfig, tokens_per_micro_batch: int) -> int:
    steps = math.ceil(config.max_tokens / (tokens_per_micro_batch * config.grad_accum))
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def _run_precision(setting: bool | str, resume_dir: Path | None, dist: Distributed) -> Precision:
    """The run's precision: measured for "auto", the same on every process, and kept by a resumed run.

    A resumed run continues in the precision its folder records, so resuming on a busier or different machine
    cannot switch precision halfway (exact resume). The peaks are measured anew for this process's MFU.
    """
    stored = resume_dir / RUN_CONFIG if resume_dir is not None else None
    if stored is not None and stored.exists():
        recorded = json.loads(stored.read_text()).get("precision")
        if recorded is not None and recorded.get("setting") == setting:
            precision = resolve_precision(recorded["bf16"], dist.device)
            return Precision(precision.bf16, setting, precision.bf16_peak_flops, precision.fp32_peak_flops)
    precision = resolve_precision(setting, dist.device)
    bf16 = dist.all_true(precision.bf16)  # bf16 only where every process measured it faster
    return Precision(bf16, setting, precision.bf16_peak_flops, precision.fp32_peak_flops)


def _accumulate(
    forward, model, data: TrainingData, carried: CarriedMemory, grad_accum: int, autocast, dist: Distributed
):
    """Forward/backward over `grad_accum` micro-batches.

    Each micro-batch's mean loss is weighted by its share of the step's valid tokens over all processes (times
    the world size, which DDP's gradient average divides out), so one process and W processes over the same
    global batch compute the same gradient: the token mean over the whole step. A row that continues a document
    starts from the memory its stream's previous row left (`carried`, detached).
    """
    model.train()
    batches = [data.next_batch() for _ in range(grad_accum)]
    counts = torch.tensor(
        [[int((b.targets != -100).sum()), b.targets.numel()] for b in batches], dtype=torch.float64
    )
    step_valid, step_tokens = _global_sum(counts.sum(0), dist).tolist()
    total_loss, act_mean, act_var = 0.0, 0.0, 0.0
    for micro, batch in enumerate(batches):
        input_ids, targets = batch.input_ids.to(dist.device), batch.targets.to(dist.device)
        weight = counts[micro, 0].item() * dist.world_size / max(step_valid, 1.0)
        sync = contextlib.nullcontext() if micro == grad_accum - 1 or not dist.enabled else forward.no_sync()
        with sync:
            with autocast():
                memory_state = carried.state_for(batch.stream, batch.documents)
                out = forward(input_ids, targets=targets, memory_state=memory_state)
            (out.loss * weight).backward()
        carried.update(batch.stream, out.memory_state, batch.documents)
        total_loss += out.loss.item() * weight / dist.world_size
        act_mean += float(out.act["mean_steps"]) / grad_accum
        act_var += float(out.act["var_steps"]) / grad_accum
    total_loss = _global_sum(torch.tensor([total_loss], dtype=torch.float64), dist).item()
    return total_loss, {"mean_steps": act_mean, "var_steps": act_var}, int(step_tokens)


def _global_sum(values: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if not dist.enabled:
        return values
    values = values.to(dist.device)
    torch.distributed.all_reduce(values)
    return values.cpu()


@torch.no_grad()
def validate(model, data: TrainingData, n_batches: int, autocast, dist: Distributed) -> dict:
    """Token-weighted mean loss over the held-out split, with the model in inference mode (t_infer steps, ACT):
    overall, after each refinement step (val_loss_step_t), and the mean and variance of the halting step. A long
    document's rows are read in order, with the memory carried from one to the next."""
    model.eval()
    # Token-weighted sums: loss, tokens, halting step, its square, then the loss after each step.
    sums = torch.zeros(4 + model.cfg.t_infer, device=dist.device, dtype=torch.float64)
    carried = CarriedMemory()  # long documents are read as in training: row after row, memory carried
    for batch in data.validation_batches(n_batches):
        input_ids, targets = batch.input_ids.to(dist.device), batch.targets.to(dist.device)
        with autocast():
            out = model(
                input_ids, targets=targets, memory_state=carried.state_for(batch.stream, batch.documents)
            )
        carried.update(batch.stream, out.memory_state, batch.documents)
        valid = targets != -100
        n_valid = int(valid.sum())
        if n_valid:
            steps = out.act["steps"][valid].double()
            step_losses = [losses[valid].mean() for losses in out.step_losses]
            means = [out.losses["ref"], 1.0, steps.mean(), steps.square().mean(), *step_losses]
            sums += torch.tensor([float(x) for x in means], device=dist.device, dtype=torch.float64) * n_valid
    if dist.enabled:
        torch.distributed.all_reduce(sums)
    model.train()
    loss, _, steps, steps_squared, *step_losses = (sums / sums[1].clamp_min(1)).tolist()
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_act_mean_steps": steps,
        "val_act_var_steps": max(steps_squared - steps**2, 0.0),
    } | {f"val_loss_step_{t}": value for t, value in enumerate(step_losses, start=1)}


def _write_samples(model, tokenizer, config: TrainConfig, step: int, path: Path) -> None:
    """Greedy continuations of the sample prompts, appended to samples.jsonl and printed."""
    rows = []
    for prompt in config.sample_prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=next(model.parameters()).device)
        out = model.generate(ids, config.sample_tokens, eos_token_id=tokenizer.eos_token_id)
        rows.append({"step": step, "prompt": prompt, "completion": tokenizer.decode(out[0, ids.size(1) :])})
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for r in rows:
        print(f"sample @ {step}: {r['prompt'][-40:]!r} -> {r['completion']!r}", flush=True)


def _early_stopping(
    progress: Progress, val_loss: float, config: TrainConfig, model, run_dir: Path, dist: Distributed
) -> None:
    if val_loss < progress.best_val_loss - config.min_delta:
        progress.best_val_loss = val_loss
        progress.evals_without_improvement = 0
        if dist.is_main:
            checkpoint.save_atomic(
                {"model": model.state_dict(), "step": progress.step, "val_loss": val_loss},
                run_dir / BEST_MODEL,
            )
    else:
        progress.evals_without_improvement += 1
        if progress.evals_without_improvement >= config.patience:
            progress.stop_reason = (
                f"early stopping: no validation improvement of {config.min_delta} in "
                f"{config.patience} validations"
            )


def _weights_are_sound(model, data: TrainingData, autocast, dist: Distributed) -> bool:
    """Whether these weights are worth a checkpoint: every parameter finite, and a finite training loss (the
    quantity the guard watches) on the first validation batch. The loss test catches what the guard's own
    checks cannot, since they see the loss and gradient norm from before the update: a finite but huge update
    (lr=1e30) whose weights only the next step finds broken. The RNG is restored, so resuming stays exact."""
    finite = bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())
    if finite:
        input_ids, targets, *_ = next(iter(data.validation_batches(1)))
        devices = [dist.device.index or 0] if dist.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast():
            model.train()
            loss = model(input_ids.to(dist.device), targets=targets.to(dist.device)).loss
        finite = math.isfinite(loss.item())
    return dist.all_true(finite)


def _last_good(run_dir: Path, step: int | None) -> str:
    if step is None:
        return (
            "no checkpoint with sound weights was written; lower the learning rate (lr, muon_lr) and start "
            "again with --overwrite"
        )
    return f"the last good checkpoint is {run_dir / CHECKPOINT} (step {step}); --resume continues from it"


def _checkpoint_to_resume(run_dir: Path, dist: Distributed) -> bool:
    """Whether to resume from the run folder's checkpoint: rank 0 decides, every rank follows (and must see it)."""
    exists = dist.from_main((run_dir / CHECKPOINT).exists())
    if exists and not dist.all_true((run_dir / CHECKPOINT).exists()):
        raise RunFolderError(
            f"rank 0 resumes from {run_dir / CHECKPOINT} but another rank cannot see it: "
            "the run folder must be on a file system every node shares"
        )
    return exists


def _save(
    run_dir: Path,
    model,
    optimizer,
    data: TrainingData,
    carried: CarriedMemory,
    progress: Progress,
    start_time: float,
    dist: Distributed,
    autocast,
) -> bool:
    """Write the checkpoint, unless the weights are unsound: then the last good one stays. Returns whether it
    was written."""
    if not _weights_are_sound(model, data, autocast, dist):
        if dist.is_main:
            print(
                f"step {progress.step}: the weights, or the loss at them, are not finite; not saving them over "
                f"{run_dir / CHECKPOINT}",
                flush=True,
            )
        return False
    memory = _gather_carried(carried, dist)  # every process's streams, so any number of them can resume
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data.state_dict(),
        "carried_memory": memory,
        "rng": _rng_state(),
        "progress": {**progress.__dict__, "elapsed_s": progress.elapsed_s + time.perf_counter() - start_time},
    }
    if dist.is_main:
        checkpoint.save_atomic(state, run_dir / CHECKPOINT)
    dist.barrier()
    return True


def _continue_optimizer_state(optimizer, path: Path) -> None:
    """Take the state of the optimizer saved in checkpoint `path` (moments, step counts, Grokfast's filter) and
    keep this run's hyperparameters (its param_groups)."""
    saved = checkpoint.load(path)["optimizer"]
    ours = optimizer.state_dict()
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in ours["param_groups"]]:
        raise ConfigError(
            f"init_optimizer_from={path}: its optimizer has other parameter groups than this run's"
        )
    optimizer.load_state_dict({**saved, "param_groups": ours["param_groups"]})


def _gather_carried(carried: CarriedMemory, dist: Distributed) -> dict:
    """The carried memory of every process's streams (lanes are disjoint across processes), on every process."""
    mine = carried.state_dict()
    if not dist.enabled:
        return mine
    everyone = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return {key: entry for part in everyone for key, entry in part.items()}


def _restore(
    path: Path, model, optimizer, data: TrainingData, carried: CarriedMemory, dist: Distributed
) -> Progress:
    state = checkpoint.load(path)  # on the CPU: RNG states must stay there; load_state_dict moves the rest
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data.load_state_dict(state["data"])
    # A checkpoint from before carried memory has none: its streams start empty.
    carried.load_state_dict(
        state.get("carried_memory", {}),
        dist.device,
        keep=lambda stream: stream[1] % dist.world_size == dist.rank,
    )
    _set_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    if progress.stop_reason == "time budget reached":  # a new invocation brings a new time budget
        progress.stop_reason = None
    return progress


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class _Window:
    """Running sums between two log lines."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.losses, self.grad_norms, self.act_mean, self.act_var, self.tokens, self.seconds = (
            [],
            [],
            [],
            [],
            0,
            0.0,
        )

    def add(self, loss, grad_norm, act, tokens, seconds):
        if loss is not None:
            self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.act_mean.append(act["mean_steps"])
        self.act_var.append(act["var_steps"])
        self.tokens += tokens
        self.seconds += seconds

    def row(self, progress: Progress, lr: float, tokens_per_s: float, mfu: float, eta: str) -> dict:
        def mean(values):
            return sum(values) / len(values) if values else None

        row = {
            "step": progress.step,
            "tokens": progress.tokens,
            "loss": mean(self.losses),
            "lr": lr,
            "grad_norm": mean([g for g in self.grad_norms if math.isfinite(g)]),
            "tokens_per_s": tokens_per_s,
            "step_tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "mfu": mfu,
            "act_mean_steps": mean(self.act_mean),
            "act_var_steps": mean(self.act_var),
            "skipped_steps": progress.skipped_steps,
            "eta": eta,
        }
        self._reset()
        return row
