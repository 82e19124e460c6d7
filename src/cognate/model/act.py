"""ACT halting: a per-token halting head, its training loss, and halting statistics.

The head reads the normalised refinement state of each token and gives the probability q_t that stopping at step t
changes nothing: that step t's prediction already is the prediction of the deepest step inference runs,
R = t_infer (CALM's consistency target, Schuster et al. 2022). Training fits q_t to exactly that,

    L_act = mean over steps t < R and valid tokens of BCE(q_t, [argmax logits_t == argmax logits_R]),

and at inference a token stops at the first step whose q_t passes `act_threshold` and keeps its state from then on.
Step R itself needs no decision (the token stops there anyway), so its head is never run.

Why not "argmax logits_t == the next token" (the target this replaced): at any loss a small model reaches on natural
text that is false for most tokens at every step, so the calibrated q stays below any useful threshold and no token
ever halts; it also asks the wrong question, since halting early costs nothing where a deeper step would be just as
wrong. Agreement with step R is what halting can preserve, and it is true for most tokens once every step up to R is
trained (deep supervision), so q learns which tokens the last steps do not change.
"""

from __future__ import annotations

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
        """Halting logits [...] from final-normed states [..., D]; q = sigmoid(logit)."""
        return self.out(F.silu(self.hidden(normed_state))).squeeze(-1).float()


def halting_targets(predictions: list[Tensor]) -> list[Tensor]:
    """Per step t < R, [argmax_t == argmax_R] for predictions = the argmax of steps 1..R."""
    return [prediction == predictions[-1] for prediction in predictions[:-1]]


def act_loss(halt_logits: list[Tensor], targets: list[Tensor], valid: Tensor) -> Tensor:
    """L_act: the mean BCE of q_t against its target over the given steps and the valid (target != -100) tokens.

    halt_logits, targets: one tensor per step, shaped like valid. Non-negative, finite at any logit.
    """
    weight = valid.float()
    n_valid = weight.sum().clamp_min(1.0)
    total = halt_logits[0].new_zeros(())
    for logits, target in zip(halt_logits, targets, strict=True):
        bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        total = total + (bce * weight).sum() / n_valid
    return total / len(halt_logits)


def first_halting_step(halt_probs: list[Tensor], threshold: float, n_steps: int) -> Tensor:
    """Per-token step (1-based) at which q_t first passes `threshold`, else n_steps (q of steps 1..n_steps - 1)."""
    passed = torch.stack(halt_probs) > threshold  # [T, ...]
    last = torch.full_like(passed[0], n_steps, dtype=torch.long)
    first = passed.long().argmax(0) + 1  # argmax of a bool run picks its first True
    return torch.where(passed.any(0), first, last)


def step_statistics(steps: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance of the per-token halting step over valid tokens."""
    weight = valid.float()
    count = weight.sum().clamp_min(1.0)
    mean = (steps.float() * weight).sum() / count
    return mean, (((steps.float() - mean) ** 2) * weight).sum() / count
