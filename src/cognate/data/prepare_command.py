"""`cognate data prepare`: build a prepared data folder (shards, tokenizer, manifest.json)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from cognate.data import curriculum
from cognate.data.prepare import ConfigError, PrepareConfig, prepare
from cognate.data.readers import DataFormatError

# Bad input, bad settings, missing files or no network: one line on stderr, exit status 1.
USER_ERRORS = (ConfigError, DataFormatError, OSError, ValueError)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The options saying which documents to read; `cognate tokenizer train` shares them."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--source-dir", type=Path, help="folder of dataset files laid out like ../shared/data (docs/data.md)"
    )
    where.add_argument(
        "--builtin",
        action="store_true",
        help="the built-in SYNTHETIC curriculum (the default with no source)",
    )
    where.add_argument("--hub", action="store_true", help="download every source from the Hugging Face hub")
    parser.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    parser.add_argument(
        "--validation-fraction", type=float, help="share of each source's documents held out (default 0.05)"
    )
    parser.add_argument(
        "--infill-rate", type=float, help="share of short documents made fill-in-the-middle (default 0.1)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip bad records and count them in the manifest"
    )
    parser.add_argument("--allow-missing", action="store_true", help="go on without sources that are missing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write (replaced only with --overwrite)"
    )
    add_source_arguments(parser)
    parser.add_argument("--config", type=Path, help="YAML file of prepare settings; flags override it")
    parser.add_argument(
        "--tokenizer", type=Path, help="use this tokenizer (folder or tokenizer.json) instead"
    )
    parser.add_argument("--vocab-size", type=int, help="size of the trained tokenizer (32000; 4096 builtin)")
    parser.add_argument("--short-ratio", type=float, help="short-side share of tokens (default 0.45)")
    parser.add_argument("--short-len", type=int, help="tokens per short sequence (default 512)")
    parser.add_argument("--long-len", type=int, help="tokens per long sequence (default 4096, at most 8192)")
    parser.add_argument(
        "--mix",
        choices=(curriculum.DOWNSAMPLE, curriculum.REPEAT),
        help="meet the ratio by leaving out documents of the larger side (default) or repeating the smaller",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder")


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """YAML values first, then every flag that was given; no source at all means the built-in curriculum."""
    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    values = {}
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings")
        if unknown := sorted(set(loaded) - fields):
            raise ConfigError(f"{args.config}: unknown settings {unknown}; known: {sorted(fields)}")
        values.update(loaded)
    for name in fields:
        given = getattr(args, name, None)
        if given is not None and given is not False:
            values[name] = given
    for name in ("out", "source_dir", "tokenizer"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    if not (values.get("source_dir") or values.get("builtin") or values.get("hub")):
        values["builtin"] = True
    return PrepareConfig(**values)


def run(args: argparse.Namespace) -> int:
    try:
        manifest = prepare(config_from_args(args))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, out: Path) -> str:
    lines = [
        f"{'source':<22}{'side':<7}{'train docs':>11}{'train tokens':>14}{'val docs':>10}{'val tokens':>12}{'use':>8}"
    ]
    for name, entry in manifest["sources"].items():
        train, validation = entry["train"], entry["validation"]
        lines.append(
            f"{name:<22}{entry['side']:<7}{train['documents']:>11}{train['tokens']:>14}"
            f"{validation['documents']:>10}{validation['tokens']:>12}{train['use_factor']:>8.3f}"
        )
    rows = manifest["rows"]
    lines.append(
        f"short_ratio {manifest['short_ratio']:.4f} (target {manifest['target_short_ratio']}, validation "
        f"{manifest['validation_short_ratio']:.4f}); rows: "
        + ", ".join(f"{s} {k} {rows[s][k]['rows']}" for s in rows for k in rows[s])
    )
    timings = manifest["timings"]
    stages = [
        f"{stage} {t['seconds']:.1f}s"
        + (f" ({t['tokens_per_second']:,} tok/s)" if t.get("tokens_per_second") else "")
        for stage, t in timings.items()
        if isinstance(t, dict)
    ]
    lines.append("timings: " + ", ".join(stages) + f"; total {timings['total_seconds']:.1f}s")
    if manifest["synthetic"]:
        lines.append("NOTE: this is the built-in SYNTHETIC curriculum, not real data")
    if manifest["missing_sources"]:
        lines.append(f"missing sources: {manifest['missing_sources']}")
    if manifest["skipped_records"]:
        skipped = manifest["skipped_records"].items()
        lines.append(f"skipped bad records: { {name: entry['count'] for name, entry in skipped} }")
        if files := {name: entry["files_dropped"] for name, entry in skipped if "files_dropped" in entry}:
            lines.append(f"files dropped after a file-level error (their records not counted): {files}")
    lines.append(f"wrote {out} (vocab_size {manifest['vocab_size']}; see {out}/manifest.json)")
    return "\n".join(lines)
