"""ACT halting: a per-token halting head, its training loss, and halting statistics.

The head reads the normalised refinement state of each token and gives the probability q_t that the step-t
prediction is already right. Training fits q_t to exactly that (BCE against "argmax logits_t == target"); at
inference a token stops at the first step whose q_t passes `act_threshold` and keeps its state from then on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cognate.model.config import CognateConfig

# The halting head starts pessimistic (q ≈ 0.12): an untrained model refines every token for all steps and learns
# to stop, rather than stopping at random.
_INITIAL_HALT_LOGIT = -2.0


class HaltingHead(nn.Module):
    def __init__(self, cfg: CognateConfig) -> None:
        super().__init__()
        self.hidden = nn.Linear(cfg.d_model, cfg.act_hidden)
        self.out = nn.Linear(cfg.act_hidden, 1)
        nn.init.normal_(self.hidden.weight, std=0.02)
        nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, _INITIAL_HALT_LOGIT)

    def forward(self, normed_state: Tensor) -> Tensor:
        """Halting logits [B, S] from the final-normed state [B, S, D]; q = sigmoid(logit)."""
        return self.out(F.silu(self.hidden(normed_state))).squeeze(-1).float()


def act_loss(halt_logits: list[Tensor], correct: list[Tensor], valid: Tensor, cfg: CognateConfig) -> Tensor:
    """L_act = BCE(q_t, correct_t) + w_ent·(ln 2 − H(q_t)) + w_div·relu(target_var − Var_seq(q_t)).

    Averaged over the given steps and the valid (target != -100) tokens. Every term is non-negative and bounded
    below by 0, so the loss cannot run away to minus infinity; every term has a gradient into the halting head.
    halt_logits, correct: one [B, S] tensor per step; valid: [B, S] bool.
    """
    weight = valid.float()
    n_valid = weight.sum().clamp_min(1.0)
    total = halt_logits[0].new_zeros(())
    for logits, target in zip(halt_logits, correct, strict=True):
        q = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        entropy_gap = math.log(2.0) - binary_entropy(logits)
        per_token = bce + cfg.act_entropy_weight * entropy_gap
        total = total + (per_token * weight).sum() / n_valid
        total = total + cfg.act_diversity_weight * _diversity_penalty(q, weight, cfg.act_target_variance)
    return total / len(halt_logits)


def binary_entropy(logits: Tensor) -> Tensor:
    """H(sigmoid(l)) in nats, computed from logits so it stays finite where q saturates."""
    q = torch.sigmoid(logits)
    return F.softplus(logits) - q * logits  # = -q ln q - (1-q) ln(1-q)


def _diversity_penalty(q: Tensor, weight: Tensor, target_variance: float) -> Tensor:
    """relu(target − variance of q across a sequence's valid tokens), averaged over sequences that have 2+.

    This is the seeds' "ACT variance = 0" failure turned into a loss: if every token halts alike, this is at
    its maximum and its gradient pushes the halting probabilities of a sequence apart.
    """
    count = weight.sum(-1)
    mean = (q * weight).sum(-1) / count.clamp_min(1.0)
    variance = (((q - mean[:, None]) ** 2) * weight).sum(-1) / count.clamp_min(1.0)
    has_spread = (count >= 2).float()
    return (F.relu(target_variance - variance) * has_spread).sum() / has_spread.sum().clamp_min(1.0)


def first_halting_step(halt_probs: list[Tensor], threshold: float) -> Tensor:
    """Per-token step (1-based) at which q_t first passes `threshold`, or the last step if it never does."""
    passed = torch.stack(halt_probs) > threshold  # [T, B, S]
    last = torch.full_like(passed[0], len(halt_probs), dtype=torch.long)
    first = passed.long().argmax(0) + 1  # argmax of a bool run picks its first True
    return torch.where(passed.any(0), first, last)


def step_statistics(steps: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance of the per-token halting step over valid tokens."""
    weight = valid.float()
    count = weight.sum().clamp_min(1.0)
    mean = (steps.float() * weight).sum() / count
    return mean, (((steps.float() - mean) ** 2) * weight).sum() / count
