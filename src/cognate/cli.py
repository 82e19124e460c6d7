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
    "pretrain": (
        "cognate.pretrain_command",
        "train the three seed models and write the EvoMerge-ready layout",
    ),
    "eval": (
        "cognate.eval.commands",
        "measure a model folder: perplexity, task scores, ACT, memory, collapse",
    ),
    "generate": ("cognate.export.generate_command", "continue a prompt with a model folder"),
    "convert": (
        "cognate.export.convert_command",
        "rewrite a model folder as native or Hugging Face (hf_format, mergekit) layout",
    ),
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
            "grokfast": (
                "cognate.bench.grokfast",
                "Grokfast paper's modular-arithmetic grokking, with and without filters",
            ),
            "train": (
                "cognate.bench.train_speed",
                "training tokens/s and MFU: plain transformer vs Cognate fast path",
            ),
            "optim": (
                "cognate.bench.optim",
                "AdamW vs Muon+AdamW vs MuGrokfast: validation loss on the tiny model",
            ),
            "ablation": (
                "cognate.bench.ablation",
                "plain vs recursion vs ACT vs memory vs full, at one budget",
            ),
            "generate": (
                "cognate.bench.generate_speed",
                "generation tokens/s: KV cache vs recompute, native vs Hugging Face export",
            ),
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


# Exceptions that are the user's to fix, "module:Class" -> exit status (2: a setting or usage, 1: a file, the data,
# or a run that cannot go on). A class counts only once its module is imported, which it must be to be raised.
USER_ERRORS = {
    "cognate.errors:UsageError": 2,
    "cognate.model.config:ConfigError": 2,  # also TrainConfig's and the optimizer presets'
    "cognate.data.prepare:ConfigError": 2,
    "cognate.train.trainer:RunFolderError": 2,
    "cognate.merge.methods:MergeError": 2,
    "cognate.errors:InputFileError": 1,
    "cognate.data.readers:DataFormatError": 1,
    "cognate.merge.compat:IncompatibleModelsError": 1,
    "cognate.eval.evaluate:EvalError": 1,
    "cognate.train.trainer:NonFiniteTrainingError": 1,
    "builtins:FileNotFoundError": 1,
    "builtins:NotADirectoryError": 1,
    "builtins:IsADirectoryError": 1,
    "builtins:FileExistsError": 1,
}
# Commands' arguments that name model folders: checked (config.json, model.safetensors) before the command runs.
MODEL_FOLDER_ARGUMENTS = {"eval": "model", "generate": "model"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(selected=[a for a in argv if not a.startswith("-")][:2])
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        if args.command in MODEL_FOLDER_ARGUMENTS:
            from cognate.errors import check_model_folder

            check_model_folder(getattr(args, MODEL_FOLDER_ARGUMENTS[args.command]))
        return int(run(args) or 0)
    except Exception as error:
        status = user_error_status(error)
        if status is None:
            raise  # a bug: its traceback is what is needed
        print("error: " + " ".join(line.strip() for line in str(error).splitlines()), file=sys.stderr)
        return status


def user_error_status(error: BaseException) -> int | None:
    """The exit status for a user error (see USER_ERRORS), None for anything else."""
    for name, status in USER_ERRORS.items():
        module, _, cls = name.partition(":")
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], cls)):
            return status
    return None


if __name__ == "__main__":
    sys.exit(main())
