"""Learning-rate schedule: linear warmup, then cosine decay to a floor, both counted in tokens.

Counting in tokens (not micro-steps, not updates) keeps the schedule the same when batch size, gradient
accumulation or the number of processes change — the seeds' cosine was counted in micro-steps and ended early.
"""

from __future__ import annotations

import math


def lr_multiplier(tokens_seen: int, warmup_tokens: int, total_tokens: int, min_ratio: float) -> float:
    """Factor in [min_ratio, 1] applied to every parameter group's base learning rate."""
    if warmup_tokens > 0 and tokens_seen < warmup_tokens:
        return (tokens_seen + 1) / (warmup_tokens + 1)
    decay_tokens = max(1, total_tokens - warmup_tokens)
    progress = min(1.0, (tokens_seen - warmup_tokens) / decay_tokens)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
