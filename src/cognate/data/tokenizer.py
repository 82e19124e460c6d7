"""The byte-level BPE tokenizer: training it on the curriculum, loading it, and encoding documents fast.

Special tokens (ids 0-4 in a tokenizer trained here):
    <|pad|>          padding; never a training target
    <|endoftext|>    end of document, the separator between packed documents (also the eos for generation)
    <|fim_prefix|> <|fim_suffix|> <|fim_middle|>    fill-in-the-middle markers of the infill documents
Text that happens to contain these strings is encoded as plain text, so only the packer creates boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|endoftext|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
SPECIAL_TOKENS = (PAD, EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
DEFAULT_VOCAB_SIZE = 32_000
MAX_VOCAB_SIZE = 65_536  # token ids are stored as uint16


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    eos: int
    fim_prefix: int
    fim_suffix: int
    fim_middle: int


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenization, every byte in the base alphabet) trained on `texts`.

    A small corpus may run out of merges before `vocab_size`; the result is then smaller (see `len(tokenizer)`).
    """
    if not len(SPECIAL_TOKENS) + 256 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be in [{len(SPECIAL_TOKENS) + 256}, {MAX_VOCAB_SIZE}], got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer, length=len(texts))
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by `save_tokenizer` (a folder), any `transformers` fast-tokenizer folder, or a bare
    `tokenizer.json`. Our special tokens are registered when the vocabulary has them."""
    path = Path(path)
    if path.is_dir():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    elif path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        raise FileNotFoundError(f"no tokenizer at {path}")
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token is None and EOS in vocab:
        tokenizer.eos_token = EOS
    if tokenizer.pad_token is None and PAD in vocab:
        tokenizer.pad_token = PAD
    return tokenizer


def complete_special_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make a given tokenizer usable for packing: it must have an eos; a pad distinct from it and the FIM
    markers are added when missing (growing the vocabulary, as `transformers` does)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token, which the packer needs to separate documents")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > MAX_VOCAB_SIZE:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens; uint16 shards hold at most {MAX_VOCAB_SIZE}"
        )
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialTokenIds:
    ids = tokenizer.convert_tokens_to_ids([FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE])
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None or tokenizer.unk_token_id in ids:
        raise ValueError(
            "the tokenizer lacks pad, eos or fill-in-the-middle tokens; see complete_special_tokens"
        )
    return SpecialTokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, *ids)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> str:
    """Save as a `transformers` folder (tokenizer.json and its config); returns tokenizer.json's sha256."""
    tokenizer.save_pretrained(folder)
    return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, batch-encoded in Rust on every core, special-token strings kept as plain text."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
