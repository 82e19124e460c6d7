"""The LM head fused with its cross-entropy, chunked over tokens so the full [tokens, vocab] logits never exist.

With a 32,000-token vocabulary the logits of a 4,096-token batch are 131M numbers: materialising them in fp32, their
log-softmax, its gradient and the dtype copies in between costs more time than every matmul of a 25M-parameter model
(profiled: argmax, log_softmax forward/backward, copies and fills were ~40% of a training step on CPU). Here each
chunk of rows is projected, reduced to what training needs (the CE sum and each row's CE, which the halting head's
target compares across steps) and, when gradients are wanted, turned straight into its share of the input and
weight gradients, as Liger-Kernel's fused linear cross-entropy does. Only one chunk's logits are alive at a time; the matmuls run in the autocast dtype and the softmax in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cognate.model.kernels import compiled_where_available

IGNORE_INDEX = -100
# Rows per chunk: 256 rows of a 32,000-token vocabulary are 16 MB of bf16 logits, small enough to stay in cache
# between the matmul and the reductions (larger chunks measured ~40% slower on CPU: the matmul becomes
# memory-bound) and large enough for efficient matmuls.
CHUNK_ELEMENTS = 256 * 32_000


@dataclass
class HeadLoss:
    loss_sum: Tensor  # scalar fp32: sum of CE over the rows whose target is not IGNORE_INDEX (differentiable)
    target_ce: Tensor  # [N] fp32, detached: each row's CE against its target (0 where the target is ignored)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> HeadLoss:
    """CE of `hidden @ weight.T` against `targets` without the full logits; see the module docstring.

    hidden: [N, D]; weight: [V, D]; targets: [N] (IGNORE_INDEX = no target). Under autocast the matmuls run
    in the autocast dtype, as `nn.Linear` would; gradients flow to `hidden` and `weight` through `loss_sum` only.
    """
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        if wants_grad:
            loss_sum, target_ce = _FusedLinearCrossEntropy.apply(hidden_c, weight_c, targets)
        else:
            loss_sum, target_ce, _, _ = _forward(hidden_c, weight_c, targets, with_grad=False)
    return HeadLoss(loss_sum, target_ce)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed with the loss (the chunk's logits are at hand then) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor):
        loss_sum, target_ce, grad_hidden, grad_weight = _forward(hidden, weight, targets, with_grad=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(target_ce)
        return loss_sum, target_ce

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(grad_hidden.dtype),
            None,
        )


def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, *, with_grad: bool):
    n_rows, vocab = hidden.size(0), weight.size(0)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
    target_ce = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if with_grad else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if with_grad else None
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        logits = hidden[rows] @ weight.T
        target = targets[rows]
        log_z, target_logit = _chunk_statistics(logits, target.clamp_min(0))
        valid = target != IGNORE_INDEX
        target_ce[rows] = torch.where(valid, log_z - target_logit, 0.0)
        loss_sum += target_ce[rows].sum()
        if with_grad:
            grad_logits = _chunk_gradient(logits, log_z, target.clamp_min(0), valid)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.T @ hidden[rows]).float()
    return loss_sum, target_ce, grad_hidden, grad_weight


def _statistics(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, in fp32: log-sum-exp and the target's logit."""
    x = logits.float()
    row_max = x.amax(dim=-1)
    log_z = row_max + (x - row_max[:, None]).exp().sum(dim=-1).log()
    return log_z, x.gather(1, target[:, None]).squeeze(1)


def _gradient(logits: Tensor, log_z: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """d(CE)/d(logits) = softmax - one_hot(target), zero on rows without a target, in the logits' dtype."""
    x = logits.float()
    one_hot = torch.arange(x.size(1), device=x.device)[None, :] == target[:, None]
    return ((x - log_z[:, None]).exp() - one_hot.float()).mul(valid[:, None]).to(logits.dtype)


_chunk_statistics = compiled_where_available(_statistics)
_chunk_gradient = compiled_where_available(_gradient)
