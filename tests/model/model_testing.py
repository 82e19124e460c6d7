"""Small models for the model tests: a few thousand parameters, memory active from 8 tokens, chunks of 4."""

import torch

from cognate.model.config import CognateConfig
from cognate.model.model import CognateModel

VOCAB = 61


def small_config(**changes) -> CognateConfig:
    base = CognateConfig(
        name="test",
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        max_seq_len=256,
        t_train=3,
        t_infer=3,
        grad_steps=2,
        act_hidden=16,
        mem_capacity=6,
        mem_topk=3,
        mem_dim=16,
        mem_chunk_size=4,
    )
    return base.replace(**changes)


def small_model(seed: int = 0, diverse_halting: bool = True, **changes) -> CognateModel:
    """A small model; with diverse_halting its (untrained) halting head sends tokens to different steps."""
    torch.manual_seed(seed)
    model = CognateModel(small_config(**changes))
    if diverse_halting:
        with torch.no_grad():
            model.halting.out.weight.normal_(std=3.0)
            model.halting.out.bias.zero_()
    return model


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def small_tokenizer_and_config(seed: int, **changes):
    """A 400-token BPE trained on the built-in curriculum (generated with `seed`) and a small `tiny` config over
    it, for the export and evaluation tests that need a model folder with a real tokenizer."""
    from cognate.data import synthetic
    from cognate.data.tokenizer import train_tokenizer
    from cognate.model.config import get_preset

    texts = [d.text for docs in synthetic.generate(seed=seed).values() for d in docs][:300]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    small = dict(d_model=32, n_heads=2, n_layers=2, ffn_hidden=64, mem_dim=16)
    config = get_preset("tiny").replace(vocab_size=len(tokenizer), **{**small, **changes})
    return tokenizer, config
