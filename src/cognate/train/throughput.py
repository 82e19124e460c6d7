"""Throughput accounting: the machine's measured matmul peak and the model's FLOPs per token, for MFU.

MFU is reported against a peak measured on this machine in this process (a large bf16 matmul), not a datasheet
figure, so a CPU run and a GPU run are judged by the same rule.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from cognate.model.model import CognateModel


@functools.cache
def measure_matmul_flops(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    size: int = 2048,
    min_seconds: float = 0.5,
) -> float:
    """Sustained FLOP/s of a square matmul in `dtype`, best of repeated timings.

    Measured once per process and argument set: the later runs of one process (the seeds of `cognate pretrain`)
    start while background threads (compilation workers) may still be busy, which would understate the peak.
    """
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(
        0
    )  # leaves the global RNG, and so exact resume, untouched
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up: kernel selection, lazy initialisation
    synchronize(device)
    best, elapsed_total = float("inf"), 0.0
    while elapsed_total < min_seconds:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, elapsed_total = min(best, elapsed), elapsed_total + elapsed
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_params(*modules: nn.Module) -> int:
    """Parameters that take part in a matmul per token: every weight of 2 or more dims except embedding tables."""
    total = 0
    for module in modules:
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        total += sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in embeddings)
    return total


def flops_per_token(model: CognateModel, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token of one forward (+ backward when training) at `seq_len`, counting only what really runs."""
    return sum(flops_breakdown(model, seq_len, training=training).values())


def supervised_steps(cfg) -> set[int]:
    """The training steps that carry a loss and gradients: 1..t_infer (every step inference may answer from) and
    the last grad_steps; the steps in between run under no_grad."""
    answer_step = min(cfg.t_infer, cfg.t_train)
    return set(range(1, answer_step + 1)) | set(range(cfg.t_train - cfg.grad_steps + 1, cfg.t_train + 1))


def flops_breakdown(model: CognateModel, seq_len: int, *, training: bool = True) -> dict[str, float]:
    """FLOPs per token by what runs: the blocks of the supervised steps and of the no_grad steps, the halting
    head, the memory and the LM head (each summed over the steps it runs on).

    Every refinement step runs the blocks (2 FLOPs per matmul weight, plus attention's two matmuls over the causal
    half of the visible context); the halting head runs on steps 1..t_infer - 1, where it decides. The memory (its
    reads in every block and the write/read projections) runs whenever it is enabled, at every length; its write
    surprise needs no LM head (cognate.model.model.token_surprise). Training supervises steps 1..t_infer and the last
    grad_steps: each costs 3x its forward with the LM head; the steps in between run under no_grad and cost one
    forward without it. Inference counts every step for every token: halting can only lower it.
    """
    cfg = model.cfg
    memory_on = cfg.mem_enabled
    context = min(seq_len, cfg.attn_window or seq_len)
    attention = 2 * 2 * cfg.n_layers * cfg.d_model * context / 2
    blocks = 2 * sum(matmul_params(block.attn, block.ffn) for block in model.layers) + attention
    memory = (
        2 * matmul_params(model.memory, *(block.memory_read for block in model.layers)) if memory_on else 0.0
    )
    head = 2 * matmul_params(model.lm_head)
    answer_step = min(cfg.t_infer, cfg.t_train if training else cfg.t_infer)
    halting = (answer_step - 1) * 2 * matmul_params(model.halting) if cfg.act_enabled else 0.0
    if not training:
        return {
            "blocks": cfg.t_infer * blocks,
            "halting": halting,
            "memory": cfg.t_infer * memory,
            "lm_head": head,
        }
    supervised = len(supervised_steps(cfg))
    unsupervised = cfg.t_train - supervised
    return {
        "grad_step_blocks": 3 * supervised * blocks,
        "no_grad_step_blocks": unsupervised * blocks,
        "halting": 3 * halting,
        "memory": (3 * supervised + unsupervised) * memory,
        "lm_head": 3 * supervised * head,
    }
