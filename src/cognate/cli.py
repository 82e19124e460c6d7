"""The `cognate` command line.

Each subcommand lives beside the code it drives: a module with `add_arguments(parser)` and `run(args) -> int`.
This file only wires them together, importing a module when its command runs, so `cognate --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help). Nested groups map to their own tables.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("cognate.model.commands", "print a preset's configuration and parameter counts"),
    "train": ("cognate.train.commands", "train one model (single process, or DDP under torchrun)"),
    "merge": ("cognate.merge.commands", "merge model folders: a method, a recipe, or an evolutionary search"),
    "pretrain": ("cognate.pretrain_command", "train the three seed models and write the EvoMerge-ready layout"),
    "eval": ("cognate.eval.commands", "measure a model folder: perplexity, task scores, ACT, memory, collapse"),
    "generate": ("cognate.export.generate_command", "continue a prompt with a model folder"),
    "convert": ("cognate.export.convert_command", "rewrite a model folder as native or Hugging Face (hf_format, mergekit) layout"),
}

GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "data": (
        "prepare the training curriculum",
        {"prepare": ("cognate.data.prepare_command", "load, mix, tokenize and pack the curriculum")},
    ),
    "tokenizer": (
        "build the byte-level BPE tokenizer",
        {"train": ("cognate.data.tokenizer_command", "train a byte-level BPE on the curriculum")},
    ),
    "bench": (
        "run a benchmark and print its figures as one JSON line",
        {
            "memory-recall": ("cognate.bench.memory_recall", "long-range key-value recall, memory on vs off"),
            "scaling": ("cognate.bench.scaling", "forward+backward time per token against sequence length"),
            "grokfast": ("cognate.bench.grokfast", "Grokfast paper's modular-arithmetic grokking, with and without filters"),
            "train": ("cognate.bench.train_speed", "training tokens/s and MFU: plain transformer vs Cognate fast path"),
            "optim": ("cognate.bench.optim", "AdamW vs Muon+AdamW vs MuGrokfast: validation loss on the tiny model"),
            "ablation": ("cognate.bench.ablation", "plain vs recursion vs ACT vs memory vs full, at one budget"),
            "generate": ("cognate.bench.generate_speed", "generation tokens/s: KV cache vs recompute, native vs Hugging Face export"),
        },
    ),
}


def build_parser(selected: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser. `selected` is the argv prefix naming a command; only that module is imported."""
    parser = argparse.ArgumentParser(prog="cognate", description="Pretrain small recursive reasoning LMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = selected or []
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if selected[:1] == [name]:
            _attach(sub, module)
    for group, (group_help, table) in GROUPS.items():
        group_parser = subparsers.add_parser(group, help=group_help, description=group_help)
        group_sub = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        for name, (module, help_text) in table.items():
            sub = group_sub.add_parser(name, help=help_text, description=help_text)
            if selected[:2] == [group, name]:
                _attach(sub, module)
    return parser


def _attach(parser: argparse.ArgumentParser, module_name: str) -> None:
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(selected=[a for a in argv if not a.startswith("-")][:2])
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
