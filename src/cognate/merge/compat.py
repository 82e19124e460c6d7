"""Can these models be merged? Same architecture (tensor names, shapes, dtypes) and same vocabulary.

Parameter-space merging adds tensors entry by entry, so two models are mergeable only when every tensor lines up
and row r of every embedding means the same token in both. `check_compatible` compares every model with the first
and raises one error listing everything that differs, vocabulary first because it is the usual cause.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch

# Tensors whose rows are indexed by token id: input embeddings and output heads, under the names the common
# layouts use (ours, llama's `embed_tokens`/`lm_head`, GPT-2's `wte`).
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed|embedding|embeddings|embed_tokens|tok_embeddings|token_embedding|wte|lm_head)\.weight$"
)

_MAX_LISTED = 5  # names listed per kind of difference before "and N more"


class IncompatibleModelsError(ValueError):
    """The models differ in architecture or vocabulary; the message names the tensors and shapes that differ."""


def check_compatible(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]], tokenizer_hashes: Mapping[str, str] | None = None
) -> None:
    """Raise IncompatibleModelsError unless all models (by name) share tensor names, shapes, dtypes and vocabulary.

    `tokenizer_hashes` (model name -> hash, e.g. from `tokenizer_hash`) adds a check that the tokenizers are the
    same, which embedding shapes alone cannot tell (two different 32k vocabularies have the same shapes).
    """
    if not state_dicts:
        raise IncompatibleModelsError("no models given")
    problems = _vocabulary_problems(state_dicts, tokenizer_hashes or {}) + _architecture_problems(state_dicts)
    if problems:
        raise IncompatibleModelsError("models cannot be merged:\n" + "\n".join(f"  - {p}" for p in problems))


def tokenizer_hash(directory: str | Path) -> str:
    """sha256 of a saved tokenizer's `tokenizer.json`: equal hashes mean the same token ids for the same text."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _vocabulary_problems(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]], tokenizer_hashes: Mapping[str, str]
) -> list[str]:
    problems = []
    (ref_name, ref), *others = state_dicts.items()
    for name, sd in others:
        for key, tensor in ref.items():
            other = sd.get(key)
            if VOCAB_TENSOR.search(key) and other is not None and _rows_only_differ(tensor, other):
                problems.append(
                    f"different vocabularies: {key} has {tensor.shape[0]} rows (tokens) in {ref_name} "
                    f"but {other.shape[0]} in {name}"
                )
    hashed = [name for name in state_dicts if name in tokenizer_hashes]
    if hashed and len({tokenizer_hashes[name] for name in hashed}) > 1:
        listing = ", ".join(f"{name}: {tokenizer_hashes[name][:12]}" for name in hashed)
        problems.append(f"different tokenizers (tokenizer.json sha256 {listing})")
    return problems


def _architecture_problems(state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    problems = []
    (ref_name, ref), *others = state_dicts.items()
    for name, sd in others:
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing:
            problems.append(f"{name} lacks {len(missing)} tensor(s) that {ref_name} has: {_listing(missing)}")
        if extra:
            problems.append(f"{name} has {len(extra)} tensor(s) that {ref_name} lacks: {_listing(extra)}")
        shared = [k for k in ref if k in sd]
        shapes = [
            f"{k} is {tuple(ref[k].shape)} in {ref_name} but {tuple(sd[k].shape)} in {name}"
            for k in shared
            if ref[k].shape != sd[k].shape
            and not (VOCAB_TENSOR.search(k) and _rows_only_differ(ref[k], sd[k]))
        ]
        if shapes:
            problems.append(f"different shapes: {_listing(shapes, sep='; ')}")
        dtypes = [
            f"{k} is {ref[k].dtype} in {ref_name} but {sd[k].dtype} in {name}"
            for k in shared
            if ref[k].dtype != sd[k].dtype
        ]
        if dtypes:
            problems.append(f"different dtypes: {_listing(dtypes, sep='; ')}")
    return problems


def _rows_only_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two 2-D tensors with the same width and a different number of rows (tokens, for a vocabulary tensor)."""
    return a.dim() == b.dim() == 2 and a.shape[1] == b.shape[1] and a.shape[0] != b.shape[0]


def _listing(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}{sep}and {len(items) - _MAX_LISTED} more"
