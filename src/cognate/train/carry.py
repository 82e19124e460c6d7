"""Memory carried along the streams of rows: a document longer than a row is read as consecutive segments.

The data sampler (`MixedBatchSampler`) lays each kind's rows out in parallel streams: row b of one batch of a
stream (kind, lane) is followed by row b of the stream's next batch. Where that next row continues the same
document (same document id, index + 1), the model gets the memory state the previous row left, detached, as in
Transformer-XL and the Recurrent Memory Transformer: gradients stay within a segment, the content flows on. A row
that starts a document (or holds whole documents only) starts from empty memory. Attention does not cross rows;
the memory is what a segment knows of the earlier ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cognate.model.config import CognateConfig, ConfigError
from cognate.model.memory import MemoryState
from cognate.model.neural_memory import NeuralMemoryState

# The carried state classes by name (checkpoints hold tensors, ints and strings only).
STATE_CLASSES = {cls.__name__: cls for cls in (MemoryState, NeuralMemoryState)}


def _state_tensors(state) -> list[str]:
    return [f.name for f in dataclasses.fields(state) if f.name != "next_chunk"]


def continues_document(before: np.ndarray, now: np.ndarray) -> np.ndarray:
    """[B] bool: whether each row of `now` is the next row of the document row b of `before` holds; both
    [B, 2] (document, index in it), document < 0 for rows of whole documents."""
    return (now[:, 0] >= 0) & (now[:, 0] == before[:, 0]) & (now[:, 1] == before[:, 1] + 1)


def check_carry(config: CognateConfig, seq_lens: dict[str, int], multi_row: dict[str, bool]) -> None:
    """Rows that carry memory must be whole memory chunks: a trailing part chunk would be prepended to the next
    row of every stream, whichever document it starts."""
    for kind, seq_len in seq_lens.items():
        if config.mem_enabled and multi_row[kind] and seq_len % config.mem_chunk_size:
            raise ConfigError(
                f"mem_chunk_size={config.mem_chunk_size} does not divide the {kind} rows' {seq_len} tokens: a "
                "document longer than a row carries memory from row to row only in whole chunks"
            )


class CarriedMemory:
    """The memory state each stream left after its last batch, with that batch's (document, index) per row."""

    def __init__(self):
        self.streams: dict[tuple[str, int], tuple[MemoryState, np.ndarray]] = {}

    def state_for(self, stream: tuple[str, int], documents: np.ndarray) -> MemoryState | None:
        """The memory to run the stream's next batch with: carried for the rows that continue a document,
        empty for the others; None when no row continues one."""
        held = self.streams.get(stream)
        if held is None:
            return None
        state, before = held
        if len(documents) < len(
            before
        ):  # streams of unequal length: the batch holds the first ones still going
            state, before = state.select(list(range(len(documents)))), before[: len(documents)]
        continues = continues_document(before, documents)
        if not continues.any():
            return None
        return state if continues.all() else state.reset(torch.from_numpy(~continues))

    def update(self, stream: tuple[str, int], state: MemoryState | None, documents: np.ndarray) -> None:
        """Keep `state` (detached) for the stream's next batch, if one of its rows is part of a long document."""
        if state is None or not (documents[:, 0] >= 0).any():
            self.streams.pop(stream, None)
        else:
            self.streams[stream] = (state.detach(), np.array(documents))

    def clear(self) -> None:
        self.streams.clear()

    def state_dict(self) -> dict:
        """Tensors and ints only (checkpoints load with weights_only=True), on the CPU; keyed "kind/lane"."""
        return {
            f"{kind}/{lane}": {name: getattr(state, name).cpu() for name in _state_tensors(state)}
            | {
                "next_chunk": state.next_chunk,
                "documents": torch.from_numpy(documents),
                "state_class": type(state).__name__,
            }
            for (kind, lane), (state, documents) in self.streams.items()
        }

    def load_state_dict(self, saved: dict, device, keep=lambda stream: True) -> None:
        """Restore the streams `keep` accepts (a process keeps its own lanes)."""
        self.streams = {}
        for key, entry in saved.items():
            kind, lane = key.rsplit("/", 1)
            stream = (kind, int(lane))
            if keep(stream):
                state_class = STATE_CLASSES[entry.get("state_class", MemoryState.__name__)]
                tensors = {
                    f.name: entry[f.name].to(device)
                    for f in dataclasses.fields(state_class)
                    if f.name != "next_chunk"
                }
                state = state_class(next_chunk=int(entry["next_chunk"]), **tensors)
                self.streams[stream] = (state, entry["documents"].numpy())
