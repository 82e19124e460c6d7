"""`cognate convert`: a model folder from one layout to the other, the weights unchanged.

    native   what `cognate pretrain` / `cognate train` write (native weight names, training_stats.json, hf_format/)
    hf       a self-contained Hugging Face folder: `hf_format/`, or a mergekit output made from such folders
             (weight names prefixed `model.`, modeling_cognate.py, the tokenizer with its beginning of sequence)

The input's layout is read from its weight names. Weights keep their values; a merged folder saved in bfloat16 is
widened to the native float32 (exactly). The tokenizer goes through `hf_tokenizer` / `native_tokenizer`, which
are exact inverses, so native -> hf -> native gives back the same tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LAYOUTS = ("native", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a model folder of either layout")
    parser.add_argument("--to", choices=LAYOUTS, required=True, help="the layout to write")
    parser.add_argument("--out", type=Path, required=True, help="a new folder to write the model to")


def run(args: argparse.Namespace) -> int:
    try:
        convert(args.model, args.out, args.to)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.to} layout)")
    return 0


def convert(source: Path, out: Path, to: str) -> Path:
    """Write the model folder `source` to `out` in layout `to` ("native" or "hf"); returns `out`."""
    from cognate.data.tokenizer import load_tokenizer
    from cognate.export.hf import export_hf, native_tokenizer
    from cognate.export.model_dir import load_model_dir, save_model_dir

    source, out = Path(source), Path(out)
    if to not in LAYOUTS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(LAYOUTS)}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder")
    model = load_model_dir(source)
    tokenizer = native_tokenizer(load_tokenizer(source)) if (source / "tokenizer.json").is_file() else None
    if to == "hf":
        export_hf(model.state_dict(), model.cfg, out, tokenizer)
        return out
    stats_file = source / "training_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"name": model.cfg.name}
    save_model_dir(model, out, tokenizer=tokenizer, stats={**stats, "converted_from": str(source)})
    return out
