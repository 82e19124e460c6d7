"""Throughput accounting: the machine's measured matmul peak and the model's FLOPs per token, for MFU.

MFU is reported against a peak measured on this machine in this process (a large bf16 matmul), not a datasheet
figure, so a CPU run and a GPU run are judged by the same rule.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from cognate.model.config import CognateConfig


def measure_matmul_flops(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    size: int = 2048,
    min_seconds: float = 0.5,
) -> float:
    """Sustained FLOP/s of a square matmul in `dtype`, best of repeated timings."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(
        0
    )  # leaves the global RNG, and so exact resume, untouched
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, lazy initialisation
    sync()
    best, elapsed_total = float("inf"), 0.0
    while elapsed_total < min_seconds:
        start = time.perf_counter()
        a @ b
        sync()
        elapsed = time.perf_counter() - start
        best, elapsed_total = min(best, elapsed), elapsed_total + elapsed
    return 2 * size**3 / best


def matmul_params(module: nn.Module) -> int:
    """Parameters that take part in a matmul per token: every weight of 2 or more dims except embedding tables."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in embeddings)


def flops_per_token(
    model: nn.Module, config: CognateConfig, seq_len: int, *, grad_steps: int, no_grad_steps: int = 0
) -> float:
    """Training FLOPs per token, counting every refinement step the model really runs.

    A step with gradients costs forward + backward (3x the forward); a step under no_grad costs one forward.
    Attention adds 2 matmuls over the visible context (half the window on average, causal).
    """
    context = min(seq_len, config.attn_window or seq_len)
    attention = 2 * 2 * config.n_layers * config.d_model * context / 2
    forward = 2 * matmul_params(model) + attention
    return forward * (3 * grad_steps + no_grad_steps)
