"""User errors: what the command line reports as one `error: ...` line instead of a traceback, and with which
exit status (2: a bad setting or usage, 1: a file or the data, or a run that cannot go on).

The classes raised elsewhere that count as user errors are listed in `cli.py`; this module holds the two kinds
that have no home of their own, and the checks of the files every command reads (a model folder's config.json
and model.safetensors), so each names the file it rejects.
"""

from __future__ import annotations

import json
from pathlib import Path


class UsageError(ValueError):
    """A command-line setting that cannot work (exit status 2)."""


class InputFileError(ValueError):
    """A file that is missing or cannot be read as what it should be (exit status 1)."""


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or an InputFileError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputFileError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def check_safetensors(path: Path) -> None:
    """An InputFileError naming `path` unless its header reads and covers the whole file (a truncated or
    corrupted file fails here, without reading the tensors)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise InputFileError(f"{path}: not a readable safetensors file ({error})") from None


def check_model_folder(folder: Path) -> None:
    """An InputFileError naming the file when a model folder's config.json or model.safetensors is missing or
    malformed, before a command spends time on it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder} is not a model folder (no such directory)")
    if not (folder / "config.json").is_file():
        raise InputFileError(f"{folder} is not a model folder (no config.json)")
    config = read_json_object(folder / "config.json")
    from cognate.export.model_dir import WEIGHTS, config_from_hf_dict
    from cognate.model.config import ConfigError

    try:
        config_from_hf_dict(config)
    except (KeyError, TypeError, ConfigError) as error:
        raise InputFileError(f"{folder / 'config.json'}: not a Cognate model config ({error})") from None
    check_safetensors(folder / WEIGHTS)
