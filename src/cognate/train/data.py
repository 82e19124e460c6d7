"""The trainer's view of a prepared data folder: micro-batches of short and long rows in a resumable order,
a fixed validation subset, and the built-in curriculum when no folder is given."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

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


class TrainingData:
    """Micro-batches for one process. With W processes, process r takes micro-batches r, r+W, ... of the
    single-process order, so W processes with grad_accum A/W see exactly what one process with A sees."""

    def __init__(self, data_dir: Path, *, batch_size: int, seed: int, dist: Distributed):
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
        )
        self._batches = iter(self.sampler)

    @property
    def tokens_per_micro_batch(self) -> int:
        """Global (all processes) tokens in one micro-batch step, taking the short size as the nominal one."""
        return self.batch_size["short"] * self.seq_lens["short"] * self.dist.world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        kind, rows = next(self._batches)
        return self.train[kind].batch(rows)

    def validation_batches(self, n_batches: int):
        """The first `n_batches` (over all processes) of a fixed order of the held-out rows."""
        rows = {k: len(v) for k, v in self.validation.items()}
        if not any(rows.values()):
            raise ValueError("the data folder has no validation rows")
        sampler = MixedBatchSampler(
            rows,
            self.batch_size,
            seed=VALIDATION_SEED,
            drop_last=False,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        per_process = max(1, n_batches // self.dist.world_size)
        for kind, indices in itertools.islice(sampler, min(per_process, sampler.batches_per_epoch())):
            yield self.validation[kind].batch(indices)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._batches = iter(self.sampler)
