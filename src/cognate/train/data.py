"""The trainer's view of a prepared data folder: micro-batches of short and long rows in a resumable order,
a fixed validation subset, and the built-in curriculum when no folder is given."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cognate.data.dataset import MANIFEST, OLDEST_FORMAT, MixedBatchSampler, PackedDataset, read_manifest
from cognate.train.distributed import Distributed

VALIDATION_SEED = 0  # the validation subset is the same for every run and every evaluation


def builtin_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "cognate" / "builtin"


def ensure_data(data_dir: Path | None, dist: Distributed) -> Path:
    """The given prepared folder, or the built-in synthetic curriculum (prepared once, on rank 0, then cached)."""
    if data_dir is not None:
        read_manifest(data_dir)  # fails early, with a clear message, when the folder is not prepared
        return Path(data_dir)
    folder = builtin_data_dir()
    if dist.is_main and not _is_current(folder):
        from cognate.data.prepare import PrepareConfig, prepare

        print(f"no --data given: preparing the built-in synthetic curriculum in {folder}", flush=True)
        prepare(PrepareConfig(out=folder, builtin=True, overwrite=True))
    dist.barrier()
    return folder


def _is_current(folder: Path) -> bool:
    """Whether the cached built-in folder is prepared, in a format this version reads (else it is rebuilt)."""
    path = folder / MANIFEST
    return path.exists() and int(read_manifest(folder).get("format_version", 1)) >= OLDEST_FORMAT


def tokenizer_vocab_size(data_dir: Path) -> int:
    return int(read_manifest(data_dir)["tokenizer"]["vocab_size"])


def batch_sizes(short_batch: int, seq_lens: dict[str, int]) -> dict[str, int]:
    """Rows per micro-batch of each kind, so a long micro-batch holds about as many tokens as a short one."""
    short_tokens = short_batch * seq_lens["short"]
    return {"short": short_batch, "long": max(1, short_tokens // seq_lens["long"])}


class Batch(NamedTuple):
    """One micro-batch: rows of one kind, from the parallel streams (kind, lane) of the sampler."""

    input_ids: torch.Tensor  # [B, seq_len]
    targets: torch.Tensor  # [B, seq_len]
    stream: tuple[str, int]  # (kind, lane): row b continues row b of the stream's previous batch
    documents: np.ndarray  # [B, 2]: each row's (document, index in it); document < 0 for whole documents only


class TrainingData:
    """Micro-batches for one process. With W processes, process r takes micro-batches r, r+W, ... of the
    single-process order, so W processes with grad_accum A/W see exactly what one process with A sees. The
    streams (see `MixedBatchSampler`) have one lane per micro-batch of an update over all processes: lane m is
    micro-batch m of every update, always on process m mod W."""

    def __init__(self, data_dir: Path, *, batch_size: int, seed: int, dist: Distributed, grad_accum: int = 1):
        self.train = {kind: PackedDataset(data_dir, "train", kind) for kind in ("short", "long")}
        self.validation = {kind: PackedDataset(data_dir, "validation", kind) for kind in ("short", "long")}
        self.seq_lens = {kind: data.seq_len for kind, data in self.train.items()}
        self.batch_size = batch_sizes(batch_size, self.seq_lens)
        self.dist = dist
        self.sampler = MixedBatchSampler(
            {k: len(v) for k, v in self.train.items()},
            self.batch_size,
            seed=seed,
            rank=dist.rank,
            world_size=dist.world_size,
            documents={k: v.documents[:, 0] for k, v in self.train.items()},
            lanes=grad_accum * dist.world_size,
        )
        self._batches = self.sampler.iter_with_lanes()

    @property
    def multi_row(self) -> dict[str, bool]:
        """Whether each kind holds documents longer than a row (whose rows carry memory)."""
        splits = (self.train, self.validation)
        return {
            kind: any(bool((s[kind].documents[:, 0] >= 0).any()) for s in splits) for kind in self.seq_lens
        }

    @property
    def tokens_per_micro_batch(self) -> int:
        """Global (all processes) tokens in one micro-batch step, taking the short size as the nominal one."""
        return self.batch_size["short"] * self.seq_lens["short"] * self.dist.world_size

    def next_batch(self) -> Batch:
        kind, rows, lane = next(self._batches)
        return Batch(*self.train[kind].batch(rows), (kind, lane), self.train[kind].documents[rows])

    def validation_batches(self, n_batches: int):
        """The first `n_batches` (over all processes) of a fixed order of the held-out rows, in streams with
        one lane per process (a kind with fewer rows than a batch comes in one smaller batch)."""
        rows = {k: len(v) for k, v in self.validation.items()}
        if not any(rows.values()):
            raise ValueError("the data folder has no validation rows")
        sampler = MixedBatchSampler(
            rows,
            {k: min(size, rows[k]) or 1 for k, size in self.batch_size.items()},
            seed=VALIDATION_SEED,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            documents={k: v.documents[:, 0] for k, v in self.validation.items()},
        )
        per_process = max(1, n_batches // self.dist.world_size)
        batches = itertools.islice(sampler.iter_with_lanes(), min(per_process, sampler.batches_per_epoch()))
        for kind, indices, lane in batches:
            data = self.validation[kind]
            yield Batch(*data.batch(indices), (kind, lane), data.documents[indices])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._batches = self.sampler.iter_with_lanes()
