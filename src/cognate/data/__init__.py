"""The data curriculum: source loaders, formatting, tokenizer, mixing, packing and shards.

What the rest of Cognate uses (imported lazily, so `cognate data prepare` does not load torch):
    PackedDataset, MixedBatchSampler, read_manifest   (cognate.data.dataset)
    load_tokenizer, special_token_ids, SpecialTokenIds (cognate.data.tokenizer)
    PrepareConfig, prepare                             (cognate.data.prepare)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedDataset": "cognate.data.dataset",
    "MixedBatchSampler": "cognate.data.dataset",
    "read_manifest": "cognate.data.dataset",
    "load_tokenizer": "cognate.data.tokenizer",
    "special_token_ids": "cognate.data.tokenizer",
    "SpecialTokenIds": "cognate.data.tokenizer",
    "PrepareConfig": "cognate.data.prepare",
    "prepare": "cognate.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cognate.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
