"""`cognate tokenizer train`: train the byte-level BPE on the curriculum's training documents.

The documents are the ones `cognate data prepare` would train on (same sources, split and seed), so a tokenizer
trained here and passed to `data prepare --tokenizer` never saw the validation documents either.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cognate.data.prepare import PrepareConfig, collect, split_documents, tokenizer_selection
from cognate.data.prepare_command import USER_ERRORS, add_source_arguments, config_from_args
from cognate.data.readers import SkipLog
from cognate.data.tokenizer import encode_texts, save_tokenizer, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json and its config")
    add_source_arguments(parser)
    parser.add_argument("--vocab-size", type=int, help="entries in the vocabulary (32000; 4096 builtin)")


def run(args: argparse.Namespace) -> int:
    try:
        config: PrepareConfig = config_from_args(args)
        corpus = collect(config, SkipLog() if config.skip_bad else None)
        train_docs, _ = split_documents(corpus, config)
        selected = tokenizer_selection(train_docs, corpus.sides, config)
        texts = [d.text for d, keep in zip(train_docs, selected.tolist(), strict=True) if keep]
        start = time.perf_counter()
        tokenizer = train_tokenizer(texts, config.trained_vocab_size)
        seconds = time.perf_counter() - start
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    digest = save_tokenizer(tokenizer, args.out)
    tokens = sum(len(ids) for ids in encode_texts(tokenizer, texts))
    print(
        json.dumps(
            {
                "out": str(args.out),
                "vocab_size": len(tokenizer),
                "sha256": digest,
                "synthetic": corpus.synthetic,
                "documents": len(texts),
                "tokens": tokens,
                "train_seconds": round(seconds, 3),
                "train_tokens_per_second": round(tokens / seconds) if seconds else None,
            }
        )
    )
    return 0
