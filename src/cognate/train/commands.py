"""`cognate train`: train one model from a preset, a YAML config and command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cognate.errors import UsageError, check_safetensors
from cognate.model.config import SPECIALIZATIONS, CognateConfig, get_preset, specialize
from cognate.train.config import (
    TEST_OVERRIDES,
    TrainConfig,
    check_field_types,
    load_yaml,
    parse_overrides,
    split_overrides,
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a model and training setup; `cognate pretrain` shares them."""
    parser.add_argument("--preset", default="tiny", help="model size preset (tiny, cognate-25m, ...)")
    parser.add_argument(
        "--model", choices=SPECIALIZATIONS, help="specialization applied on top of the preset"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="a prepared data folder (`cognate data prepare`); default: "
        "the built-in synthetic curriculum, prepared once into ~/.cache/cognate/builtin",
    )
    parser.add_argument("--config", type=Path, help="YAML file of model and training settings")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one model or training setting (repeatable), e.g. --set lr=3e-4",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--test", action="store_true", help="a quick run of a few steps to check the setup")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever run is in --out")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="disabled")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")


def resolve_configs(
    args: argparse.Namespace, vocab_size: int | None = None, train_defaults: dict | None = None
) -> tuple[CognateConfig, TrainConfig]:
    """Preset, then specialization, then the caller's defaults, then --test's quick settings, then the YAML file,
    then --set overrides, in that order: what the user sets explicitly wins (so a 2-process --test run can match a
    1-process one's global batch). Every value's type is checked before any config is built."""
    model = get_preset(args.preset)
    if args.model:
        model = specialize(model, args.model)
    values = dict(train_defaults or {})
    values.update(TEST_OVERRIDES if args.test else {})
    values.update(load_yaml(args.config) if args.config else {})
    values.update(parse_overrides(args.overrides))
    model_values, train_values = split_overrides(values, {f.name for f in dataclasses.fields(CognateConfig)})
    if vocab_size is not None and "vocab_size" not in model_values:
        model_values["vocab_size"] = vocab_size
    check_field_types(CognateConfig, model_values)
    model = model.replace(**model_values)
    train = TrainConfig(**train_values)
    if train.init_from is not None:
        check_safetensors(Path(train.init_from))
    return model, train


def check_tensorboard(wanted: bool) -> None:
    """Fail at once, not after the run's setup, when --tensorboard is asked for without the package."""
    import importlib.util

    if wanted and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'cognate[tensorboard]'")


def run(args: argparse.Namespace) -> int:
    from cognate.train import distributed
    from cognate.train.data import ensure_data, tokenizer_vocab_size
    from cognate.train.trainer import train

    check_tensorboard(args.tensorboard)
    resolve_configs(args)  # every setting checked before anything is prepared or written
    dist = distributed.setup(args.device)
    try:
        data_dir = ensure_data(args.data, dist)
        model_config, train_config = resolve_configs(args, vocab_size=tokenizer_vocab_size(data_dir))
        summary = train(
            model_config,
            train_config,
            data_dir,
            args.out,
            dist,
            resume=args.resume,
            overwrite=args.overwrite,
            wandb_mode=args.wandb_mode,
            tensorboard=args.tensorboard,
        )
    finally:
        distributed.teardown()
    if dist.is_main:
        json.dump(summary, sys.stdout, indent=2)
        print()
    return 0
