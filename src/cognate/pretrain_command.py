"""`cognate pretrain`: train the three seed models and write the EvoMerge-ready layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Token budgets per size preset: the shared warm-up, then each seed. `tiny` on the built-in curriculum is sized to
# finish in under 10 minutes on 2 CPU cores (1.6M tokens at ~4-5k tokens/s, plus validation, halting calibration,
# export and the merge check; docs/pipeline.md has the measured time); `cognate-25m` is a real run for a GPU.
# --warmup-tokens / --seed-tokens override them.
BUDGETS = {"tiny": (700_000, 300_000), "cognate-25m": (50_000_000, 200_000_000)}
TEST_BUDGET = (8_192, 8_192)
# Small updates, frequent validation: a seed of `tiny` takes about 240 updates of 1,024 tokens. Early in training
# the number of updates matters more than their size (on the real curriculum, 4 x 512 tokens per update reached a
# validation loss of 5.3 after 250 updates where 8 x 512 x 2 had reached only 8.2 after 70, in similar time; on the
# built-in curriculum 2 x 512 reached 3.06 / 3.03 / 3.18 per seed where 4 x 512 reached 4.33 / 4.33 / 4.38).
TRAIN_DEFAULTS = {
    "tiny": dict(
        batch_size=2,
        grad_accum=1,
        warmup_tokens=25_000,
        eval_interval=50,
        log_interval=10,
        checkpoint_interval=50,
        eval_batches=8,
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cognate.train.commands import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (re-running resumes it)")
    parser.add_argument("--warmup-tokens", type=int, help="shared warm-up tokens before the seeds diverge")
    parser.add_argument("--seed-tokens", type=int, help="tokens each seed trains after the warm-up")
    parser.add_argument("--test", action="store_true", help="a few steps per seed, to check the setup")


def run(args: argparse.Namespace) -> int:
    from cognate.pretrain import PretrainPlan, format_table, pretrain
    from cognate.train import distributed
    from cognate.train.commands import resolve_configs
    from cognate.train.data import ensure_data, tokenizer_vocab_size

    resolve_configs(
        args, train_defaults=TRAIN_DEFAULTS.get(args.preset)
    )  # checked before anything is written
    dist = distributed.setup(args.device)
    try:
        data_dir = ensure_data(args.data, dist)
        model_config, train_config = resolve_configs(
            args, vocab_size=tokenizer_vocab_size(data_dir), train_defaults=TRAIN_DEFAULTS.get(args.preset)
        )
        warmup, seed = TEST_BUDGET if args.test else BUDGETS.get(args.preset, BUDGETS["cognate-25m"])
        plan = PretrainPlan(
            model=model_config,
            train=train_config,
            warmup_tokens=args.warmup_tokens if args.warmup_tokens is not None else warmup,
            seed_tokens=args.seed_tokens if args.seed_tokens is not None else seed,
        )
        summary = pretrain(plan, data_dir, args.out, dist)
    finally:
        distributed.teardown()
    if dist.is_main:
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in ("successful_models", "total_models", "evomerge_ready", "merge_check", "timings")
                },
                indent=2,
            )
        )
        print(format_table(summary))
        print(
            f"wrote {args.out}/evomerge_models.json and {args.out}/pretraining_summary.json", file=sys.stderr
        )
        return 0 if summary["evomerge_ready"] else 1
    return 0
