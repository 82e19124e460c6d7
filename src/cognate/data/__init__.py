"""The data curriculum: source loaders, formatting, tokenizer, mixing, packing and shards."""
