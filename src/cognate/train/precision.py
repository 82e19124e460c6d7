"""Precision chosen by measurement: bf16 autocast only where this machine runs bf16 matmuls faster than fp32.

Whether bf16 pays depends on the machine, not on the device type: a Xeon with AMX runs bf16 matmuls ~4x faster
than fp32, the same family without AMX ~2x slower, a GPU's tensor cores many times faster. So `bf16: auto` (the
default of every command) measures both matmul peaks once per process (`measure_matmul_flops`, cached) and picks

    bf16  if  peak_bf16 >= BF16_MIN_SPEEDUP · peak_fp32,   else fp32.

The margin keeps fp32 where bf16's matmul advantage is too small to pay for autocast's casts of activations and
weights. An explicit `true` / `false` always wins. MFU is then reported against the peak of the precision used.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict, dataclass

import torch

from cognate.model.config import ConfigError
from cognate.train.throughput import measure_matmul_flops

# bf16 must beat fp32 matmuls by this factor before autocast is worth its casts.
BF16_MIN_SPEEDUP = 1.2

AUTO = "auto"


@dataclass(frozen=True)
class Precision:
    bf16: bool  # autocast to bfloat16
    setting: bool | str  # what was asked: True, False or "auto"
    bf16_peak_flops: float  # measured in this process
    fp32_peak_flops: float

    @property
    def peak_flops(self) -> float:
        """The matmul peak of the precision in use: the denominator of MFU."""
        return self.bf16_peak_flops if self.bf16 else self.fp32_peak_flops

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        """One line for the log: the choice, who made it, and both peaks."""
        how = "auto" if self.setting == AUTO else "set"
        return (
            f"precision {self.name} ({how}; matmul peaks bf16 {self.bf16_peak_flops / 1e12:.3f}, "
            f"fp32 {self.fp32_peak_flops / 1e12:.3f} TFLOP/s)"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"precision": self.name}


def validate_bf16_setting(value) -> bool | str:
    """True, False or "auto"; anything else is a ConfigError naming the setting."""
    if value is True or value is False or value == AUTO:
        return value
    raise ConfigError(f"bf16={value!r} must be true, false or auto")


def choose_bf16(setting: bool | str, bf16_peak_flops: float, fp32_peak_flops: float) -> bool:
    """The autocast decision: an explicit setting wins; "auto" takes bf16 where its matmuls are clearly faster."""
    setting = validate_bf16_setting(setting)
    if setting != AUTO:
        return setting
    return bf16_peak_flops >= BF16_MIN_SPEEDUP * fp32_peak_flops


def resolve_precision(setting: bool | str, device: torch.device | str) -> Precision:
    """Measure both matmul peaks on `device` (once per process) and choose the precision for `setting`."""
    device = torch.device(device)
    bf16_peak = measure_matmul_flops(torch.bfloat16, device)
    fp32_peak = measure_matmul_flops(torch.float32, device)
    return Precision(choose_bf16(setting, bf16_peak, fp32_peak), setting, bf16_peak, fp32_peak)


def autocast_for(device: torch.device, bf16: bool):
    """A context-manager factory: bf16 autocast on `device`, or nothing."""
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def parse_bf16_flag(text: str) -> bool | str:
    """`--bf16` values on the command line: auto, true/on/1, false/off/0."""
    value = text.strip().lower()
    if value in ("true", "on", "1", "yes"):
        return True
    if value in ("false", "off", "0", "no"):
        return False
    if value == AUTO:
        return AUTO
    raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, true, false")


def add_bf16_argument(parser: argparse.ArgumentParser, default: bool | str = AUTO) -> None:
    """`--bf16 [auto|true|false]`: bare `--bf16` means true; auto uses bf16 where its matmuls measure faster."""
    parser.add_argument(
        "--bf16",
        type=parse_bf16_flag,
        nargs="?",
        const=True,
        default=default,
        metavar="auto|true|false",
        help=f"bfloat16 autocast: auto uses it where this machine's bf16 matmuls are faster (default {default})",
    )


# Token-by-token decoding multiplies vectors, not matrices: it is bound by reading the weights, and autocast
# re-casts every weight to bf16 on each call, so the square-matmul peaks that decide training say nothing about it.
# Measured on a 2-core AMD EPYC with avx512_bf16 (bf16 matmul peak 4x fp32): 1.12 tokens/s in fp32 against 0.96
# with bf16 autocast (`cognate bench generate --bf16 false/true`, both under the same background load).
# Generation therefore defaults to fp32.
GENERATION_BF16_DEFAULT = False
