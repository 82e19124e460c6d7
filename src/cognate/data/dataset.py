"""Reading a prepared folder: packed rows as (input_ids, targets), and a resumable order over them.

    data = PackedDataset(out_dir, split="train", kind="short")
    input_ids, targets = data[0]          # int64 tensors of seq_len; targets[i] is the token after input_ids[i]
    sampler = MixedBatchSampler({"short": len(short), "long": len(long)}, {"short": 32, "long": 4}, seed=0)
    for kind, rows in sampler: ...        # state_dict()/load_state_dict() resume exactly where it stopped

Targets are -100 at padding and wherever the input token is the end-of-document token (the next token there
starts another document). See docs/data.md for the on-disk layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cognate.data.packing import loss_targets
from cognate.data.tokenizer import SpecialTokenIds
from cognate.errors import InputFileError, read_json_object

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
KINDS = ("short", "long")
# The oldest prepared-folder format this reader takes: 2 added each row's document and index in it.
OLDEST_FORMAT = 2


def row_documents_path(split: str, kind: str) -> str:
    """Where a prepared folder keeps the (document, index in it) of each row of a split and kind, int64 [rows, 2]."""
    return f"{split}/{kind}-documents.npy"


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the folder with `cognate data prepare`")
    return read_json_object(path)  # a malformed manifest is an error naming it


class PackedDataset(torch.utils.data.Dataset):
    """The rows of one split and kind, memory-mapped from the uint16 shards."""

    def __init__(self, folder: str | Path, split: str = "train", kind: str = "short"):
        if split not in SPLITS or kind not in KINDS:
            raise ValueError(
                f"split must be one of {SPLITS} and kind one of {KINDS}, got {split!r}, {kind!r}"
            )
        folder = Path(folder)
        manifest = read_manifest(folder)
        if int(manifest.get("format_version", 1)) < OLDEST_FORMAT:
            raise InputFileError(
                f"{folder / MANIFEST}: prepared by an older cognate (format {manifest.get('format_version', 1)}), "
                "without each row's document; re-run `cognate data prepare`"
            )
        self.seq_len = int(manifest["sequence_lengths"][kind])
        self.special = SpecialTokenIds(**manifest["tokenizer"]["special_token_ids"])
        shards = manifest["shards"][split][kind]
        self._shards = [
            np.memmap(folder / s["path"], dtype=np.uint16, mode="r", shape=(s["rows"], self.seq_len + 1))
            for s in shards
            if s["rows"]
        ]
        self._first_row = np.cumsum([0] + [len(s) for s in self._shards])
        # Per row: the document it holds a piece of (packing.NO_DOCUMENT for rows of whole documents) and the
        # piece's index in that document; a long document's rows are consecutive segments of one sequence.
        self.documents = np.load(folder / manifest["row_documents"][split][kind], allow_pickle=False)
        if self.documents.shape != (len(self), 2):
            raise InputFileError(
                f"{folder / manifest['row_documents'][split][kind]}: holds {self.documents.shape[0]} rows' "
                f"documents for {len(self)} rows; re-run `cognate data prepare`"
            )

    def __len__(self) -> int:
        return int(self._first_row[-1])

    def rows(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Raw packed rows (seq_len + 1 tokens each) for `indices`, as one array."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shard = np.searchsorted(self._first_row, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.uint16)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self._shards[s][indices[where] - self._first_row[s]]
        return out

    def batch(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets), each int64 of shape (len(indices), seq_len)."""
        inputs, targets = loss_targets(self.rows(indices), self.special.eos, self.special.pad)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        inputs, targets = self.batch([index % len(self)])
        return inputs[0], targets[0]


class MixedBatchSampler:
    """A deterministic, resumable order of batches over the short and long rows, in parallel streams.

    One epoch uses every row once (but the fewer than a batch left over of each kind): each kind's rows are
    shuffled by document, a document longer than a row keeping its rows together and in order, and the batches
    of both kinds are shuffled together, so short and long batches interleave and each kind's share of tokens
    over an epoch is its share in the data. The order is a function of (seed, epoch, lanes) only; the state is
    (epoch, batches done in it by all ranks together).

    Streams. Global batch g (counted over epochs) belongs to lane g mod `lanes`. Each lane holds, per kind,
    `batch_size` streams: row b of the lane's successive batches of a kind walks one stretch of the shuffled
    rows, so it reads a long document's rows one after another, and whoever processes a lane's batches can
    carry state (the model's memory) from row b of one to row b of the next. With `world_size` > 1, rank r
    takes batches r, r + world_size, ...; `lanes` must be a multiple of world_size, so a lane's batches all go
    to one rank (the trainer uses lanes = micro-batches per update over all ranks: lane = the micro-batch's
    index in its update). The state does not depend on world_size, so a run can resume on another number of
    processes when the batches done are a multiple of it.
    """

    def __init__(
        self,
        rows: dict[str, int],
        batch_size: dict[str, int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        documents: dict[str, np.ndarray] | None = None,
        lanes: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if any(batch_size.get(kind, 0) < 1 for kind, n in rows.items() if n):
            raise ValueError(f"every kind with rows needs a batch size >= 1, got {batch_size}")
        lanes = world_size if lanes is None else lanes
        if lanes < 1 or lanes % world_size:
            raise ValueError(f"lanes must be a positive multiple of world_size={world_size}, got {lanes}")
        self.rows, self.batch_size, self.seed = dict(rows), dict(batch_size), seed
        self.rank, self.world_size, self.lanes = rank, world_size, lanes
        # Per kind, each row's document (packing.NO_DOCUMENT: whole documents only); None: every row its own.
        self.documents = {kind: None if documents is None else documents.get(kind) for kind in rows}
        self.epoch, self.position = 0, 0
        batches = self._epoch_batches(0)
        if not batches:
            raise ValueError(f"no complete batch: rows {rows}, batch sizes {batch_size}")
        self._usable = len(batches) - len(batches) % world_size  # batches run per epoch, over all ranks

    def _units(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """The kind's rows shuffled by document: a multi-row document's rows stay together, in order."""
        n = self.rows[kind]
        documents = self.documents[kind]
        if documents is None:
            return rng.permutation(n)
        documents = np.asarray(documents)
        starts = np.flatnonzero(np.r_[True, (documents[1:] != documents[:-1]) | (documents[1:] < 0)])
        lengths = np.diff(np.r_[starts, n])
        order = rng.permutation(len(starts))
        first = np.repeat(starts[order] - (np.cumsum(lengths[order]) - lengths[order]), lengths[order])
        return first + np.arange(n)

    def _epoch_batches(self, epoch: int) -> list[tuple[str, np.ndarray, int]]:
        """(kind, rows, lane) of every batch of the epoch, in the order all ranks together take them."""
        rng = np.random.default_rng([self.seed, epoch])
        units = {kind: self._units(kind, rng) for kind in sorted(self.rows)}
        counts = {kind: len(order) // self.batch_size.get(kind, 1) for kind, order in units.items()}
        kinds = np.array([kind for kind in units for _ in range(counts[kind])])
        kinds = kinds[rng.permutation(len(kinds))]
        if not len(kinds):
            return []
        usable = len(kinds) - len(kinds) % self.world_size  # the same in every epoch
        lanes = (epoch * usable + np.arange(len(kinds))) % self.lanes
        batches: list = [None] * len(kinds)
        for kind, order in units.items():
            size, offset = self.batch_size.get(kind, 1), 0
            for lane in range(self.lanes):
                positions = np.flatnonzero((kinds == kind) & (lanes == lane))
                # Stream b of this lane reads order[offset + b·n : offset + (b + 1)·n], one row per batch.
                streams = order[offset : offset + size * len(positions)].reshape(size, len(positions))
                offset += size * len(positions)
                for index, position in enumerate(positions):
                    batches[position] = (kind, streams[:, index], lane)
        return batches

    def batches_per_epoch(self) -> int:
        return self._usable // self.world_size

    def iter_with_lanes(self) -> Iterator[tuple[str, np.ndarray, int]]:
        """Endless: (kind, rows, lane), epoch after epoch, from the saved position."""
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.position * self.world_size < self._usable:
                kind, rows, lane = batches[self.position * self.world_size + self.rank]
                self.position += 1
                yield kind, rows, lane
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """Endless: (kind, rows), epoch after epoch, from the saved position."""
        for kind, rows, _ in self.iter_with_lanes():
            yield kind, rows

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.position * self.world_size,
            "seed": self.seed,
            "lanes": self.lanes,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state is for seed {state['seed']}, this sampler has seed {self.seed}")
        if state.get("lanes", self.lanes) != self.lanes:  # states from before streams had no lanes
            raise ValueError(
                f"the data order was laid out in {state['lanes']} streams (micro-batches per update over all "
                f"processes) and this run has {self.lanes}: keep grad_accum x processes the same to resume"
            )
        # "position" (per process, for this world_size): what checkpoints held before "batches_done".
        done = (
            int(state["batches_done"])
            if "batches_done" in state
            else int(state["position"]) * self.world_size
        )
        if done % self.world_size:
            raise ValueError(
                f"the data order stopped after {done} batches of epoch {state['epoch']}, which {self.world_size} "
                "processes cannot share evenly; resume with a number of processes that divides it"
            )
        self.epoch, self.position = int(state["epoch"]), done // self.world_size
