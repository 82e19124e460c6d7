"""Atomic checkpoints: written to a temporary file, fsynced, then renamed over the old one.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file. Checkpoints hold
only tensors and plain Python values, so they load with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files `save_atomic` leaves when a process is killed mid-write (`.NAME.*.tmp`). Call
    it only where no save into `directory` can be under way (at the start of a run, on rank 0)."""
    stale = [path for path in Path(directory).glob(".*.tmp") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(path: Path, map_location="cpu") -> dict:
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
