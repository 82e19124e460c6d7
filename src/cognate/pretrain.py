"""`cognate pretrain`: the three seed models EvoMerge consumes, in the layout of SPEC section 5.

    OUT/
      shared-warmup/              the run every seed starts from (see "Mergeability")
      <preset>-model-{1,2,3}/     a model folder each (cognate.export.model_dir), plus run/ with its training run
      evomerge_models.json        registry: path, seed, parameters, metrics, config hash per model
      pretraining_summary.json    successful_models, total_models, evomerge_ready, timings, metrics, merge check

Mergeability. Models trained from unrelated random initialisations are not linearly mergeable: their hidden units
are permuted relative to one another, so averaging their weights destroys both. The seeds therefore share one
initialisation (INIT_SEED) and a short shared warm-up run from it, then diverge by their own seed, which sets their
data order (and dropout, when the config sets dropout > 0). The registry records this choice, and the summary
measures it: the validation loss of the plain average of the three seeds next to each seed's own.

Re-running with the same OUT resumes the warm-up or a seed that did not finish and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cognate.data.dataset import read_manifest
from cognate.data.tokenizer import load_tokenizer
from cognate.eval import tasks
from cognate.export.model_dir import WEIGHTS, load_model_dir, save_model_dir
from cognate.merge.methods import linear
from cognate.model.config import CognateConfig
from cognate.model.model import CognateModel
from cognate.train import checkpoint, trainer
from cognate.train.config import TrainConfig
from cognate.train.data import TrainingData
from cognate.train.distributed import Distributed
from cognate.train.halting import calibrate_halting
from cognate.train.precision import Precision, autocast_for, resolve_precision

SEEDS = (42, 1337, 2023)
INIT_SEED = 0
REGISTRY = "evomerge_models.json"
SUMMARY = "pretraining_summary.json"
# Held-out built-in arithmetic problems each model is scored on (`heldout_solution_accuracy`).
HELDOUT_PROBLEMS = 64
WARMUP_DIR = "shared-warmup"
REGISTRY_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PretrainPlan:
    model: CognateConfig
    train: TrainConfig  # shared by every seed; `seed`, `init_from` and `max_tokens` are set per run
    warmup_tokens: int  # tokens trained from the shared initialisation before the seeds diverge
    seed_tokens: int  # tokens each seed trains after the warm-up
    seeds: tuple[int, ...] = SEEDS
    eval_batches: int = 16  # validation batches for the final figures and the merge check
    # Each model's act_threshold is calibrated on those batches so that halting costs at most this many nats of
    # validation loss against running every step, and at most half of what the steps after the first buy
    # (cognate.train.halting); None keeps the preset's threshold.
    halting_loss_budget: float | None = 0.03


def config_hash(config: CognateConfig) -> str:
    canonical = json.dumps({k: v for k, v in config.to_dict().items() if k != "name"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_name(plan: PretrainPlan, index: int) -> str:
    return f"{plan.model.name}-model-{index}"


def pretrain(plan: PretrainPlan, data_dir: Path, out: Path, dist: Distributed) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    shared_weights = _shared_start(plan, data_dir, out, dist)
    warmup_checkpoint = out / WARMUP_DIR / trainer.CHECKPOINT
    shared_optimizer = warmup_checkpoint if plan.warmup_tokens > 0 and warmup_checkpoint.exists() else None
    timings["shared_warmup_s"] = time.perf_counter() - start

    results = []
    for index, seed in enumerate(plan.seeds, start=1):
        seed_start = time.perf_counter()
        try:
            results.append(
                _train_seed(plan, index, seed, (shared_weights, shared_optimizer), data_dir, out, dist)
            )
        except Exception as error:  # one failed seed is reported, not hidden, and does not stop the others
            if dist.enabled:
                raise  # under torchrun a rank that went on alone would pair its collectives with another seed's
            results.append(
                {
                    "name": model_name(plan, index),
                    "seed": seed,
                    "succeeded": False,
                    "error": f"{type(error).__name__}: {error}",
                }
            )
        timings[f"{model_name(plan, index)}_s"] = time.perf_counter() - seed_start

    merge_start = time.perf_counter()
    succeeded = [r for r in results if r["succeeded"]]
    merge_check = (
        _merge_check(plan, [out / r["name"] for r in succeeded], data_dir, dist)
        if len(succeeded) > 1
        else None
    )
    timings["merge_check_s"] = time.perf_counter() - merge_start
    timings["total_s"] = time.perf_counter() - start
    if dist.is_main:
        _write_registry(plan, out, succeeded, data_dir)
        precision = resolve_precision(plan.train.bf16, dist.device)
        summary = _write_summary(plan, out, results, merge_check, timings, data_dir, precision)
    else:
        summary = {}
    return summary


def _shared_start(plan: PretrainPlan, data_dir: Path, out: Path, dist: Distributed) -> Path:
    """Weights every seed starts from: INIT_SEED's initialisation, trained `warmup_tokens` if that is > 0.

    Written atomically, with what made them beside them, so a re-run never starts from a torn file or from the
    warm-up of a different model.
    """
    folder = out / WARMUP_DIR
    weights, made_by = folder / WEIGHTS, folder / "shared_start.json"
    provenance = {
        "config_hash": config_hash(plan.model),
        "warmup_tokens": plan.warmup_tokens,
        "init_seed": INIT_SEED,
    }
    if weights.exists() and made_by.exists():
        if json.loads(made_by.read_text()) != provenance:
            raise ValueError(
                f"{folder} holds the shared start of another plan ({made_by.read_text()}); use another --out"
            )
        return weights
    if plan.warmup_tokens > 0:
        config = plan.train.replace(
            seed=INIT_SEED,
            init_from=None,
            max_tokens=plan.warmup_tokens,
            warmup_tokens=min(plan.train.warmup_tokens, plan.warmup_tokens // 2),
            # Warm up, then hold the peak rate: the seeds continue from here and each decays on its own.
            min_lr_ratio=1.0,
        )
        resume = (folder / trainer.CHECKPOINT).exists()
        trainer.train(plan.model, config, data_dir, folder, dist, resume=resume)
        state = checkpoint.load(folder / trainer.CHECKPOINT)["model"]
    else:
        torch.manual_seed(INIT_SEED)
        state = CognateModel(plan.model).state_dict()
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        partial = weights.with_suffix(".partial")
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, partial)
        os.replace(partial, weights)
        made_by.write_text(json.dumps(provenance))
    dist.barrier()
    return weights


def _train_seed(
    plan: PretrainPlan,
    index: int,
    seed: int,
    shared_start: tuple[Path, Path | None],
    data_dir: Path,
    out: Path,
    dist: Distributed,
) -> dict:
    """Train one seed from the shared start: the warm-up's weights and, when there was a warm-up, its optimizer
    state (the seeds continue its moments rather than re-warming fresh ones)."""
    shared_weights, shared_optimizer = shared_start
    name = model_name(plan, index)
    folder = out / name
    stats_path = folder / "training_stats.json"
    if stats_path.exists() and json.loads(stats_path.read_text()).get("completed"):
        return {
            "name": name,
            "seed": seed,
            "succeeded": True,
            "skipped": True,
            **_registry_fields(json.loads(stats_path.read_text())),
        }
    run_dir = folder / "run"
    config = plan.train.replace(
        seed=seed,
        init_from=str(shared_weights),
        init_optimizer_from=str(shared_optimizer) if shared_optimizer is not None else None,
        max_tokens=plan.seed_tokens,
        # After a warm-up the seeds continue its optimizer state at its peak rate: re-warming would spend up to half
        # of a short seed budget climbing back to where the warm-up stopped.
        warmup_tokens=0
        if shared_optimizer is not None
        else min(plan.train.warmup_tokens, plan.seed_tokens // 2),
    )
    summary = trainer.train(
        plan.model, config, data_dir, run_dir, dist, resume=(run_dir / trainer.CHECKPOINT).exists()
    )
    model = CognateModel(plan.model)
    best = run_dir / trainer.BEST_MODEL
    model.load_state_dict(checkpoint.load(best if best.exists() else run_dir / trainer.CHECKPOINT)["model"])
    metrics = _evaluate(model, plan, data_dir, dist, calibrate=True)
    stats = {
        "name": name,
        "seed": seed,
        "completed": True,
        "synthetic": _synthetic(data_dir),
        "data": str(data_dir),
        "init": {
            "shared_weights": str(shared_weights),
            "shared_optimizer_state": str(shared_optimizer) if shared_optimizer is not None else None,
            "init_seed": INIT_SEED,
        },
        "training": summary,
        "metrics": metrics,
        "config_hash": config_hash(plan.model),
        "curve": _curve(run_dir),
    }
    if dist.is_main:
        save_model_dir(model, folder, tokenizer=load_tokenizer(data_dir), stats=stats)
    dist.barrier()
    return {
        "name": name,
        "seed": seed,
        "succeeded": True,
        **_registry_fields(json.loads(stats_path.read_text())),
    }


def _registry_fields(stats: dict) -> dict:
    return {
        "parameters": stats["parameters"],
        "metrics": stats["metrics"],
        "config_hash": stats["config_hash"],
    }


def _evaluate(
    model: CognateModel, plan: PretrainPlan, data_dir: Path, dist: Distributed, *, calibrate: bool = False
) -> dict:
    """Validation figures of `model`; with `calibrate`, after setting its halting threshold (see PretrainPlan)."""
    data = TrainingData(data_dir, batch_size=plan.train.batch_size, seed=0, dist=dist)
    model = model.to(dist.device)
    autocast = autocast_for(dist.device, resolve_precision(plan.train.bf16, dist.device).bf16)
    if calibrate and plan.halting_loss_budget is not None:
        calibration = calibrate_halting(
            model, data, plan.eval_batches, autocast, dist, plan.halting_loss_budget
        )
        metrics = dict(calibration.validation)  # measured at the calibrated threshold
        metrics["act_threshold"] = calibration.threshold
        metrics["val_halting_loss_delta"] = calibration.loss_delta
    else:
        metrics = trainer.validate(model, data, plan.eval_batches, autocast, dist)
    accuracy = heldout_solution_accuracy(model, data_dir, autocast)
    if accuracy is not None:
        metrics["heldout_synthetic_solution_accuracy"] = accuracy
    return metrics


@torch.no_grad()
def heldout_solution_accuracy(model: CognateModel, data_dir: Path, autocast) -> float | None:
    """On the built-in curriculum: the share of the worked-solution tokens of HELDOUT_PROBLEMS arithmetic
    problems that are not in the training set which the model predicts exactly (argmax, teacher-forced).

    An untrained model scores ~0 (1 in 32,000); copying the problem's numbers and following the layout of the
    steps is what a model that learned the task gets right. None for real data (see `cognate eval`).
    """
    manifest = read_manifest(data_dir)
    if not manifest.get("synthetic"):
        return None
    tokenizer = load_tokenizer(data_dir)
    device = next(model.parameters()).device
    model.eval()
    hits, total = 0, 0
    for document in tasks.synthetic_math_documents(HELDOUT_PROBLEMS, int(manifest["seed"])):
        ids, solution = tasks.solution_targets(document.text, tokenizer)
        # A document follows an end-of-text token, as in the packed rows; input position i + 1 holds ids[i].
        input_ids = torch.tensor([[tokenizer.eos_token_id, *ids]], device=device)
        with autocast():
            predicted = model(input_ids).logits[0, 1:].argmax(-1).cpu()
        scored = torch.from_numpy(solution[:-1])
        hits += int((predicted[:-1] == torch.tensor(ids[1:]))[scored].sum())
        total += int(scored.sum())
    model.train()
    return hits / max(total, 1)


def _merge_check(plan: PretrainPlan, folders: list[Path], data_dir: Path, dist: Distributed) -> dict:
    """Validation loss of the plain weight average of the seeds, next to each seed's own."""
    states = [load_file(f / WEIGHTS) for f in folders]
    average = CognateModel(plan.model)
    average.load_state_dict(linear(states, [1.0] * len(states)))
    seed_losses = {f.name: _evaluate(load_model_dir(f), plan, data_dir, dist)["val_loss"] for f in folders}
    average_loss = _evaluate(average, plan, data_dir, dist, calibrate=True)["val_loss"]
    best = min(seed_losses.values())
    return {
        "method": "plain average of the seed weights",
        "average_val_loss": average_loss,
        "seed_val_losses": seed_losses,
        "best_seed_val_loss": best,
        "average_minus_best_seed": average_loss - best,
    }


def _curve(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    keys = ("step", "tokens", "loss", "val_loss", "act_var_steps")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: r.get(k) for k in keys} for r in rows if r.get("val_loss") is not None]


def _synthetic(data_dir: Path) -> bool:
    return bool(read_manifest(data_dir).get("synthetic"))


def _write_registry(plan: PretrainPlan, out: Path, models: list[dict], data_dir: Path) -> None:
    manifest = read_manifest(data_dir)
    registry = {
        "schema_version": REGISTRY_SCHEMA_VERSION,
        "created_by": "cognate pretrain",
        "architecture": "CognateForCausalLM",
        "preset": plan.model.name,
        "config_hash": config_hash(plan.model),
        "tokenizer_sha256": manifest["tokenizer"].get("sha256"),
        "vocab_size": plan.model.vocab_size,
        "mergeability": {
            "method": "shared initialisation and warm-up",
            "init_seed": INIT_SEED,
            "shared_warmup_tokens": plan.warmup_tokens,
            "shared_weights": f"{WARMUP_DIR}/{WEIGHTS}",
            "seeds_vary": ["data order", "dropout"] if plan.model.dropout > 0 else ["data order"],
        },
        "seed_models": [
            {
                "name": m["name"],
                "path": m["name"],
                "seed": m["seed"],
                "parameters": m["parameters"],
                "config_hash": m["config_hash"],
                "metrics": m["metrics"],
                "files": {
                    "safetensors": f"{m['name']}/model.safetensors",
                    "pytorch": f"{m['name']}/pytorch_model.bin",
                    "config": f"{m['name']}/config.json",
                    "hf_format": f"{m['name']}/hf_format",
                },
            }
            for m in models
        ],
    }
    (out / REGISTRY).write_text(json.dumps(registry, indent=2))


def _write_summary(
    plan: PretrainPlan,
    out: Path,
    results: list[dict],
    merge_check: dict | None,
    timings: dict,
    data_dir: Path,
    precision: Precision,
) -> dict:
    succeeded = [r for r in results if r["succeeded"]]
    summary = {
        "successful_models": len(succeeded),
        "total_models": len(results),
        "evomerge_ready": len(succeeded) == len(results) and len(results) > 1,
        "models": results,
        "merge_check": merge_check,
        "timings": timings,
        "precision": precision.to_dict(),
        "data": {"path": str(data_dir), "synthetic": _synthetic(data_dir)},
        "plan": {
            "warmup_tokens": plan.warmup_tokens,
            "seed_tokens": plan.seed_tokens,
            "seeds": list(plan.seeds),
            "model": plan.model.to_dict(),
            "train": dataclasses.asdict(plan.train),
        },
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    """What the seeds learned, for the terminal: per seed validation loss, halting, held-out task accuracy."""
    lines = [
        f"{'model':<16}{'val loss':>10}{'ACT steps':>11}{'ACT var':>9}{'threshold':>11}{'halt cost':>11}"
        f"{'held-out arithmetic':>21}"
    ]
    for entry in summary["models"]:
        if not entry["succeeded"]:
            lines.append(f"{entry['name']:<16} failed: {entry['error']}")
            continue
        metrics = entry["metrics"]
        accuracy = metrics.get("heldout_synthetic_solution_accuracy")
        lines.append(
            f"{entry['name']:<16}{metrics['val_loss']:>10.3f}{metrics['val_act_mean_steps']:>11.2f}"
            f"{_optional(metrics.get('val_act_var_steps'), '.3f'):>9}"
            f"{_optional(metrics.get('act_threshold'), '.2f'):>11}"
            f"{_optional(metrics.get('val_halting_loss_delta'), '+.3f'):>11}"
            f"{_optional(accuracy, '.1%'):>21}"
        )
    if any("heldout_synthetic_solution_accuracy" in m.get("metrics", {}) for m in summary["models"]):
        lines.append(
            f"held-out arithmetic: solution tokens predicted exactly, {HELDOUT_PROBLEMS} problems not in the "
            "training set (chance ~0)"
        )
    if any("act_threshold" in m.get("metrics", {}) for m in summary["models"]):
        lines.append(
            "threshold: the halting threshold calibrated on validation data; halt cost: its validation loss minus "
            "that of running every refinement step"
        )
    check = summary.get("merge_check")
    if check:
        lines.append(
            f"merge check: plain average of the seeds {check['average_val_loss']:.3f}, best seed "
            f"{check['best_seed_val_loss']:.3f} ({check['average_minus_best_seed']:+.3f})"
        )
    return "\n".join(lines)


def _optional(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
