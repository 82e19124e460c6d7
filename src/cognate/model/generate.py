"""Autoregressive generation with a KV cache per (refinement step, layer), carried memory and ACT halting.

Each new token runs the same computation as evaluating the whole sequence at once: `t_infer` refinement steps with
per-token halting, every step's attention reading that step's cache (trimmed to the attention window), every step's
memory read reading that step's slot set. So greedy generation with the cache gives the same tokens as recomputing
the whole sequence for every token (`use_cache=False`), only faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cognate.model.layers import KVCache
from cognate.model.memory import MemoryState

if TYPE_CHECKING:
    from cognate.model.model import CognateModel


@dataclass
class DecodeState:
    """What generation carries from one call to the next, explicitly (the model itself holds no state).

    caches: one KV cache per refinement step and layer; position: absolute position of the next token;
    memory_state: the long-term memory; last_states: per step, the normalised state at the last position,
    against which the next token's surprise (a memory write signal) is measured.
    """

    caches: list[list[KVCache]] = field(default_factory=list)
    position: int = 0
    memory_state: MemoryState | None = None
    last_states: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def generate(
    model: CognateModel,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt of `input_ids` [B, P]; returns [B, P + n] with n <= max_new_tokens.

    temperature 0 is greedy decoding; otherwise tokens are sampled from softmax(logits / temperature), restricted
    to the smallest set of tokens whose probability reaches `top_p` (nucleus sampling). A sequence that has produced
    `eos_token_id` continues with it as padding; generation stops early once every sequence has.
    """
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got max_new_tokens={max_new_tokens}, "
            f"temperature={temperature}, top_p={top_p}"
        )
    was_training = model.training
    model.eval()
    try:
        step = _cached_step(model) if use_cache else _recomputing_step(model)
        logits = step(input_ids)
        tokens = [input_ids]
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        for produced in range(1, max_new_tokens + 1):
            token = sample(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            tokens.append(token[:, None])
            if produced == max_new_tokens or finished.all():
                break
            logits = step(token[:, None])
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)


def _cached_step(model: CognateModel) -> Callable[[Tensor], Tensor]:
    """new tokens [B, n] -> logits [B, V] of the last one; each call reads and extends the caches."""
    state = DecodeState()
    return lambda new: model.decode(new, state)[:, -1]


def _recomputing_step(model: CognateModel) -> Callable[[Tensor], Tensor]:
    """The reference: evaluate the whole sequence again for every token."""
    pieces: list[Tensor] = []

    def step(new: Tensor) -> Tensor:
        pieces.append(new)
        return model(torch.cat(pieces, dim=1)).logits[:, -1]

    return step


def sample(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row of logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
