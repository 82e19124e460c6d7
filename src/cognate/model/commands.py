"""`cognate info`: a preset's configuration and parameter counts, as a table or as JSON."""

from __future__ import annotations

import argparse
import json

import torch

from cognate.model.config import PRESETS, SPECIALIZATIONS, get_preset, specialize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cognate-25m", help=f"one of: {', '.join(sorted(PRESETS))}")
    parser.add_argument(
        "--model", choices=SPECIALIZATIONS, help="specialization applied on top of the preset"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    print(
        json.dumps(describe(args.preset, args.model))
        if args.json
        else format_table(describe(args.preset, args.model))
    )
    return 0


def describe(preset: str, specialization: str | None = None) -> dict:
    """Configuration, total parameters, the per-component breakdown (sums to the total) and one layer's."""
    from cognate.model.model import CognateModel
    from cognate.model.params import layer_breakdown, parameter_breakdown, total_parameters

    config = get_preset(preset)
    if specialization:
        config = specialize(config, specialization)
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = CognateModel(config)
    return {
        "preset": config.name,
        "total_params": total_parameters(model),
        "breakdown": parameter_breakdown(model),
        "per_layer": layer_breakdown(model.layers[0]),
        "n_layers": config.n_layers,
        "config": config.to_dict(),
    }


def format_table(info: dict) -> str:
    total = info["total_params"]
    lines = [f"{info['preset']}: {total:,} parameters", ""]
    lines += [
        f"  {name:<12} {count:>12,}  {100 * count / total:5.1f}%" for name, count in info["breakdown"].items()
    ]
    lines += ["", f"one of the {info['n_layers']} layers:"]
    lines += [f"  {name:<12} {count:>12,}" for name, count in info["per_layer"].items()]
    lines += ["", "configuration:"]
    lines += [f"  {name:<22} {value}" for name, value in info["config"].items()]
    return "\n".join(lines)
