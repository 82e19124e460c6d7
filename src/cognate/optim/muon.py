"""Muon and AdamW update rules as functions over lists of tensors (foreach ops, no per-parameter arithmetic).

Muon (Keller Jordan, 2024; reference KellerJordan/Muon): SGD momentum whose update is replaced by the nearest
semi-orthogonal matrix, found with a quintic Newton-Schulz iteration run in bf16. It is meant for the hidden weight
matrices only; everything else (embeddings, output head, norms, biases) is trained by AdamW.

Update scale: we follow the reference and multiply the orthogonalised update by sqrt(max(1, rows / cols)), so a
Muon learning rate is "spectral norm per update" and tall matrices (an FFN's up-projection) move as much per
entry as square ones. This is why Muon's learning rate is an order of magnitude above AdamW's (5e-3 vs 5e-4 in
the Phase 1 setting) rather than shared with it, as in Moonshot's RMS-matched variant.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

NS_COEFFICIENTS = (
    3.4445,
    -4.7750,
    2.0315,
)  # the reference's quintic: steepest slope at zero that still converges


def newton_schulz(matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise every matrix in `matrices` (..., rows, cols), in bf16.

    For G = U S V^T this returns about U S' V^T: singular values above ~1/300 of G's Frobenius norm come out in
    about [0.68, 1.2] rather than at exactly 1, a trade of exactness for speed that the reference found does not
    hurt training. Batched over leading dimensions; returns bf16.
    """
    if matrices.dim() < 2:
        raise ValueError(f"newton_schulz needs matrices, got a tensor of shape {tuple(matrices.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrices.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm >= spectral norm, so ||x||_2 <= 1
    batched = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):  # x <- a·x + (b·G + c·G²)·x with G = x·xᵀ, the scalings fused into the matmuls
        gram = batched @ batched.mT
        batched = torch.baddbmm(batched, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), batched, beta=a)
    x = batched.view(x.shape)
    return x.mT if tall else x


def muon_update_scale(rows: int, cols: int) -> float:
    return max(1.0, rows / cols) ** 0.5


@torch.no_grad()
def muon_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
) -> None:
    """One Muon update, in place. Matrices of the same shape are orthogonalised together in one batched call;
    parameters with more than two dimensions (conv filters) are viewed as (out, everything else)."""
    torch._foreach_lerp_(momentum_buffers, grads, 1.0 - momentum)
    updates = torch._foreach_lerp(grads, momentum_buffers, momentum) if nesterov else momentum_buffers
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, update in enumerate(updates):
        by_shape[update.shape].append(i)
    orthogonal: dict[int, torch.Tensor] = {}
    for shape, indices in by_shape.items():
        stacked = torch.stack([updates[i].reshape(shape[0], -1) for i in indices])
        result = newton_schulz(stacked, ns_steps) * muon_update_scale(*stacked.shape[-2:])
        for i, matrix in zip(indices, result.unbind(0)):
            orthogonal[i] = matrix.view(shape).to(params[i].dtype)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, [orthogonal[i] for i in range(len(params))], alpha=-lr)


@torch.no_grad()
def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update (decoupled weight decay), in place; `steps` already counts this update.

    The arithmetic is torch.optim.AdamW's foreach path, so the two agree step for step.
    """
    beta1, beta2 = betas
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [-lr / (1.0 - beta1**step) for step in steps]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [math.sqrt(1.0 - beta2**step) for step in steps])
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)
