"""Training configuration: one frozen dataclass, validated, loadable from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from cognate.model.config import ConfigError
from cognate.train.precision import validate_bf16_setting


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42  # data order, dropout and (without init_from) the initialisation
    init_from: str | None = None  # start from these weights (a .safetensors file) instead of a fresh init
    # Continue the optimizer state (moments, Grokfast's filter) saved in this checkpoint.pt, e.g. a warm-up's.
    init_optimizer_from: str | None = None
    batch_size: int = (
        8  # short sequences per micro-batch and process (long micro-batches hold as many tokens)
    )
    grad_accum: int = 4  # micro-batches per optimizer update and process: W processes see W times the batch
    max_tokens: int = 50_000_000  # the schedule's length; training stops here at the latest
    max_steps: int | None = (
        None  # optional cap on optimizer updates (quick runs), the schedule keeps max_tokens
    )
    max_minutes: float | None = None  # optional wall-clock cap; stops cleanly with a checkpoint

    optimizer: str = "mugrokfast"  # adamw | muon | mugrokfast
    optimizer_preset: str = "phase1-reduced"  # a named setting from cognate.optim
    lr: float | None = None  # overrides the preset's AdamW learning rate
    muon_lr: float | None = None  # overrides the preset's Muon learning rate
    grokfast_warmup_steps: int | None = None  # overrides the preset's updates before Grokfast amplifies
    warmup_tokens: int = 2_000_000
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of each group's base rate
    clip_norm: float = 1.0

    eval_interval: int = 100  # optimizer updates between validations
    eval_batches: int = 16
    patience: int = 5  # validations without an improvement of at least min_delta before stopping
    min_delta: float = 0.0
    log_interval: int = 10
    checkpoint_interval: int = 100
    max_nonfinite_steps: int = 5  # consecutive skipped steps (NaN/inf loss or gradient norm) before giving up

    # bfloat16 autocast: "auto" measures this machine's bf16 and fp32 matmul peaks and uses bf16 only where it is
    # faster (cognate.train.precision); true / false force it.
    bf16: bool | str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    # Continued greedily at each validation (samples.jsonl), to watch for collapse (the seeds' "colons").
    sample_prompts: tuple[str, ...] = (
        "Problem: A store has 15 apples and sells 7 of them. How many apples are left?\nSolution:\n",
        "Buggy code:\ndef add(a, b):\n    return a - b\nFixed code:\n",
        "Paragraph: Paris\nParis is the capital and largest city of France.\n"
        "Question: What is the capital of France?\nAnswer:",
    )
    sample_tokens: int = 32

    def __post_init__(self) -> None:
        check_field_types(TrainConfig, self.__dict__)
        problems = []
        for name in (
            "batch_size",
            "grad_accum",
            "max_tokens",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.optimizer not in ("adamw", "muon", "mugrokfast"):
            problems.append(f"optimizer={self.optimizer!r} must be one of adamw, muon, mugrokfast")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.warmup_tokens < 0 or self.warmup_tokens >= self.max_tokens:
            problems.append(
                f"warmup_tokens={self.warmup_tokens} must lie in [0, max_tokens={self.max_tokens})"
            )
        if self.patience <= 0:
            problems.append(f"patience={self.patience} must be positive")
        try:
            validate_bf16_setting(self.bf16)
        except ConfigError as error:
            problems.append(str(error))
        if problems:
            raise ConfigError("invalid TrainConfig: " + "; ".join(problems))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Quick settings for `--test`: a handful of updates that exercise validation, checkpointing and logging.
TEST_OVERRIDES = dict(
    max_steps=8,
    batch_size=2,
    grad_accum=2,
    eval_interval=4,
    eval_batches=2,
    log_interval=1,
    checkpoint_interval=4,
    warmup_tokens=0,
)


def check_field_types(cls: type, values: dict) -> None:
    """Raise a ConfigError naming every value in `values` that does not fit the type its field of dataclass `cls`
    declares: so `--set lr=abc` fails before anything is written, not as a TypeError deep inside a run. An int
    is a valid float; a bool is not a valid int."""
    hints = _field_types(cls)
    problems = [
        f"{name}={value!r} must be {_describe(hints[name])}"
        for name, value in values.items()
        if name in hints and not _fits(value, hints[name])
    ]
    if problems:
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems))


@functools.cache
def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fits(value, kind) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, (tuple, list)) and all(_fits(item, args[0]) for item in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # a type this check does not know: the dataclass's own validation decides


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    if origin is tuple:
        return f"a list (each item {_describe(args[0])})"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings from the command line, values parsed as YAML scalars (so 3e-4, true, null work)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        overrides[key.strip()] = _scalar(value)
    return overrides


def _scalar(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; a float is what anyone means
        try:
            return float(value)
        except ValueError:
            pass
    return value


def split_overrides(values: dict, model_fields: set[str]) -> tuple[dict, dict]:
    """Route each override to the model or the training config; an unknown key is an error naming it."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - train_fields - model_fields)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    model = {k: v for k, v in values.items() if k in model_fields}
    train = {k: v for k, v in values.items() if k in train_fields}
    if "sample_prompts" in train:
        train["sample_prompts"] = tuple(train["sample_prompts"])
    return model, train


def load_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of key: value")
    return values
