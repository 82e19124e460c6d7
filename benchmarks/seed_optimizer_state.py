"""Seeds after a shared warm-up: continuing the warm-up's optimizer state against fresh optimizer moments.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/seed_optimizer_state.py DATA OUT WARMUP_TOKENS SEED_TOKENS

Trains the `tiny` preset with `cognate pretrain`'s settings for it: a warm-up from INIT_SEED, then seeds 42 and
1337 from its weights, each once with `init_optimizer_from` (what `cognate pretrain` does) and once without.
Prints one JSON object: the warm-up's last validation loss and each seed run's last validation loss and steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cognate.model.config import get_preset
from cognate.pretrain import INIT_SEED, SEEDS
from cognate.pretrain_command import TRAIN_DEFAULTS
from cognate.train import checkpoint, trainer
from cognate.train.config import TrainConfig
from cognate.train.distributed import Distributed


def last_val_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row][-1]


def main(data: Path, out: Path, warmup_tokens: int, seed_tokens: int) -> dict:
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    model = get_preset("tiny").replace(vocab_size=vocab)
    dist = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    settings = {**TRAIN_DEFAULTS["tiny"], "sample_prompts": ()}
    started = time.perf_counter()
    warmup = TrainConfig(
        **settings, seed=INIT_SEED, max_tokens=warmup_tokens, warmup_tokens=warmup_tokens // 2
    )
    trainer.train(model, warmup, data, out / "warmup", dist, overwrite=True)
    saved = out / "warmup" / trainer.CHECKPOINT
    weights = out / "warmup.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.load(saved)["model"].items()}, weights)
    results = {"warmup_val_loss": last_val_loss(out / "warmup")}
    for seed in SEEDS[:2]:
        for continued in (True, False):
            config = TrainConfig(
                **settings,
                seed=seed,
                init_from=str(weights),
                init_optimizer_from=str(saved) if continued else None,
                max_tokens=seed_tokens,
                warmup_tokens=seed_tokens // 2,
            )
            run = out / f"seed{seed}-{'continued' if continued else 'fresh'}"
            summary = trainer.train(model, config, data, run, dist, overwrite=True)
            results[run.name] = {"val_loss": last_val_loss(run), "steps": summary["steps"]}
    results["seconds"] = round(time.perf_counter() - started)
    return results


if __name__ == "__main__":
    data_dir, out_dir, warmup, seeds = sys.argv[1:5]
    print(json.dumps(main(Path(data_dir), Path(out_dir), int(warmup), int(seeds)), indent=1))
