"""ACT halting: a per-token halting head, its training loss, and halting statistics.

The head reads the normalised refinement state of each token and gives the probability q_t that stopping at step t
costs (almost) nothing: that step t's CE on the next token is at most `act_tolerance` nats above that of the deepest
step inference runs, R = t_infer (CALM's "risk consistency", Schuster et al. 2022). Training fits q_t to exactly that,

    L_act = mean over steps t < R and valid tokens of BCE(q_t, [CE_t <= CE_R + act_tolerance]),

and at inference a token stops at the first step whose q_t passes `act_threshold` and keeps its state from then on.
Step R itself needs no decision (the token stops there anyway), so its head is never run.

Why this target. The one it replaced, "argmax logits_t == the next token", is false for most tokens of natural text
at any loss a small model reaches, at every step: the calibrated q stays below any useful threshold and no token
halts; and it asks the wrong question, since halting costs nothing where a deeper step is just as wrong. CALM's other
target, agreement of step t's argmax with step R's, is true for most tokens but too lenient: on the built-in
curriculum after the tiny warm-up, 92% of tokens agree, and halting all of them costs 0.10 nats of validation loss,
because the second step sharpens the distribution without changing its argmax. Halting exactly the tokens whose
step-1 CE is within 0.1 nats of step 2's would halt 49% at a cost of 0.028 nats. The CE of each step comes from
the fused head at no extra cost (cognate.model.head).

Initialisation. The output bias starts at -0.5 (q ≈ 0.38), a little below the default threshold: an untrained model
refines every token, and a few hundred updates suffice to cross. (A start at q = 0.12 could not: the bias learns at
the AdamW rate, and in about 150 updates of the tiny preset with 92% positive targets it moved from -2.00 to -1.96
and mean q only to 0.23.) The start does not depend on `act_threshold`, so training never reads the threshold: it is an
inference setting, and the loss it costs can be measured for any value on one trained model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cognate.model.config import CognateConfig

# q ≈ 0.38 at the start (see the module docstring).
_INITIAL_HALT_LOGIT = -0.5


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


def halting_targets(step_ce: list[Tensor], tolerance: float) -> list[Tensor]:
    """Per step t < R, [CE_t <= CE_R + tolerance], for step_ce = each token's CE at steps 1..R."""
    return [ce <= step_ce[-1] + tolerance for ce in step_ce[:-1]]


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
