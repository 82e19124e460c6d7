"""CognateModel: a causal transformer core applied T times (TRM-style refinement) with ACT halting and memory.

    e   = embed(x) · √d                                    token embedding, unit RMS
    h_0 = e
    h_t = core(h_{t-1} + e)                                 t = 1..T; core = blocks, then RMS normalisation
    logits_t = lm_head(final_norm(h_t))                     every step is supervised (deep supervision)
    q_t = sigmoid(halting(final_norm(h_t)))                 per-token halting probability

Training runs `t_train` steps, the first `t_train - grad_steps` under no_grad (TRM's trick: memory does not grow
with T), and L_ref is the mean next-token CE over the steps with gradients. Evaluation runs `t_infer` steps; a
token halts at the first step whose q_t passes `act_threshold`, and from then on keeps its state (so its logits
stop changing) while the other tokens go on. In every block the memory read of step t comes from a bank built
from h_{t-1}. The data pipeline shifts labels (targets[:, i] is the token after input_ids[:, i]); the model never
does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cognate.model.act import HaltingHead, act_loss, first_halting_step, step_statistics
from cognate.model.config import CognateConfig
from cognate.model.generate import DecodeState, generate
from cognate.model.head import IGNORE_INDEX, fused_linear_cross_entropy
from cognate.model.layers import Block, KVCache, RMSNorm, Rotary, rms_normalize
from cognate.model.memory import LongTermMemory, MemoryBank, MemoryState


@dataclass
class CognateOutput:
    loss: Tensor | None  # L_ref + w_act·L_act + w_read·L_read + w_write·L_write; None without targets
    losses: dict[str, Tensor]  # ref, act, read, write (0 when that part is off or there is nothing to score)
    # [B, S, V] final logits (in evaluation: each token's logits at its halting step). None when targets are given:
    # the fused head computes the loss without materialising them.
    logits: Tensor | None
    act: dict[str, Tensor]  # steps [B, S] (halting step per token), mean_steps, var_steps, mean_halt_prob
    memory: dict[str, Tensor]  # the memory's statistics for this call (empty when memory is off)
    # The memory after this call, to pass to the next call that continues the sequence; None when memory is off.
    memory_state: MemoryState | None


class CognateModel(nn.Module):
    def __init__(self, cfg: CognateConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Names follow the Llama convention (embed_tokens, layers.{i}, norm, lm_head) so tools that infer layouts
        # from weight names (mergekit, EvoMerge loaders) find the embeddings, the layers and the head.
        # Built even when act_enabled / mem_enabled are off, so every specialization of a size has the same
        # tensors and the three seed models stay mergeable.
        self.halting = HaltingHead(cfg)
        self.memory = LongTermMemory(cfg)
        # Unit-RMS token vectors (std d^-1/2, times √d), so the injected input is on par with the unit-RMS state.
        nn.init.normal_(self.embed_tokens.weight, std=cfg.d_model**-0.5)
        self.embed_scale = math.sqrt(cfg.d_model)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    # --- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        memory_state: MemoryState | None = None,
        n_steps: int | None = None,
    ) -> CognateOutput:
        """input_ids, targets: [B, S] (targets already shifted, -100 = ignore). n_steps overrides t_train/t_infer."""
        cfg = self.cfg
        n_steps = n_steps or (cfg.t_train if self.training else cfg.t_infer)
        memory_on = cfg.mem_enabled and (memory_state is not None or input_ids.size(1) >= cfg.mem_min_seq_len)
        refine = self._refine_train if self.training else self._refine_infer
        return refine(input_ids, targets, memory_on, memory_state, n_steps)

    def _refine_train(
        self,
        input_ids: Tensor,
        targets: Tensor | None,
        memory_on: bool,
        memory_state: MemoryState | None,
        n_steps: int,
    ) -> CognateOutput:
        cfg = self.cfg
        e, rotary = self._embed(input_ids, start=0)
        first_grad_step = n_steps - min(cfg.grad_steps, n_steps) + 1
        fused = targets is not None  # the loss without materialising logits (see cognate.model.head)
        surprise_labels = next_token_labels(input_ids) if fused and memory_on else None
        valid = _valid(input_ids, targets)
        n_valid = valid.sum().clamp_min(1)
        h, surprise, logits = e, None, None
        banks: list[MemoryBank] = []
        ref_losses, halt_logits, correct, halt_probs = [], [], [], []
        for step in range(1, n_steps + 1):
            carries_grad = step >= first_grad_step
            needs_head = carries_grad or memory_on
            with contextlib.nullcontext() if carries_grad else torch.no_grad():
                bank = self.memory.build(step, h, surprise, memory_state) if memory_on else None
                h = self._core(h + e, rotary, bank)
                normed = self.norm(h)
                halt_logit = self.halting(normed) if cfg.act_enabled else None
                if fused and needs_head:
                    head = self._head_loss(normed, targets, surprise_labels)
                elif needs_head:
                    logits = self.lm_head(normed)
            if bank is not None:
                banks.append(bank)
                surprise = (
                    _surprise_from_label_ce(head.label_ce.view_as(input_ids))
                    if fused
                    else token_surprise(logits.detach(), input_ids)
                )
            if halt_logit is not None:
                halt_probs.append(torch.sigmoid(halt_logit.detach()))
            if carries_grad and fused:
                ref_losses.append(head.loss_sum / n_valid)
                if halt_logit is not None:
                    halt_logits.append(halt_logit)
                    correct.append(head.correct.view_as(targets))
        steps = (
            first_halting_step(halt_probs, cfg.act_threshold)
            if halt_probs
            else torch.full_like(input_ids, n_steps)
        )
        losses = {
            "ref": torch.stack(ref_losses).mean() if ref_losses else _zero(e),
            "act": act_loss(halt_logits, correct, valid, cfg) if halt_logits else _zero(e),
        }
        grad_banks = banks[first_grad_step - 1 :]
        return self._output(logits, losses, targets, steps, halt_probs, valid, banks, grad_banks)

    @torch.no_grad()
    def _refine_infer(
        self,
        input_ids: Tensor,
        targets: Tensor | None,
        memory_on: bool,
        memory_state: MemoryState | None,
        n_steps: int,
        decode: DecodeState | None = None,
    ) -> CognateOutput:
        """Evaluation with per-token halting; with `decode`, the incremental form generation uses.

        With targets the fused head scores each step (as in training) and no logits are materialised: the final
        states of halted tokens are frozen, so the last step's CE is each token's CE at its halting step.
        """
        cfg = self.cfg
        e, rotary = self._embed(input_ids, start=decode.position if decode else 0)
        fused = targets is not None
        surprise_labels = next_token_labels(input_ids) if fused and memory_on else None
        h, surprise, logits, head = e, None, None, None
        halted = torch.zeros_like(input_ids, dtype=torch.bool)
        banks: list[MemoryBank] = []
        halt_logits, correct, halt_probs, last_logits = [], [], [], []
        for step in range(1, n_steps + 1):
            bank = self.memory.build(step, h, surprise, memory_state) if memory_on else None
            caches = decode.caches[step - 1] if decode else None
            h = torch.where(halted[..., None], h, self._core(h + e, rotary, bank, caches))
            normed = self.norm(h)
            if fused and (bank is not None or cfg.act_enabled):
                head = self._head_loss(normed, targets, surprise_labels)
            elif not fused and (bank is not None or step == n_steps):
                logits = self.lm_head(normed)
            if bank is not None:
                banks.append(bank)
                if fused:
                    surprise = _surprise_from_label_ce(head.label_ce.view_as(input_ids))
                else:
                    previous = decode.last_logits[step - 1] if decode and decode.last_logits else None
                    surprise = token_surprise(logits, input_ids, previous)
                    last_logits.append(logits[:, -1])
            if cfg.act_enabled:
                halt_logit = self.halting(normed)
                halt_probs.append(torch.sigmoid(halt_logit))
                if fused:
                    halt_logits.append(halt_logit)
                    correct.append(head.correct.view_as(targets))
                halted |= halt_probs[-1] > cfg.act_threshold
            if halted.all() and not memory_on and decode is None:
                break  # nothing left to refine; with memory every step's bank is still needed for the next call
        valid = _valid(input_ids, targets)
        steps = (
            first_halting_step(halt_probs, cfg.act_threshold)
            if halt_probs
            else torch.full_like(input_ids, n_steps)
        )
        if fused and head is None:  # neither halting nor memory scored the steps: score the final states
            head = self._head_loss(normed, targets, None)
        if not fused and logits is None:  # stopped early: read out the (frozen) final states
            logits = self.lm_head(normed)
        if decode is not None:
            decode.position += input_ids.size(1)
            decode.last_logits = last_logits
        losses = {
            "ref": head.loss_sum / valid.sum().clamp_min(1) if fused else _zero(e),
            "act": act_loss(halt_logits, correct, valid, cfg) if halt_logits else _zero(e),
        }
        return self._output(logits, losses, targets, steps, halt_probs, valid, banks, banks)

    @torch.no_grad()
    def decode(self, input_ids: Tensor, state: DecodeState) -> Tensor:
        """Logits [B, n, V] of n new tokens that continue the sequence `state` holds; advances `state`.

        Same computation as evaluating the whole sequence at once (t_infer steps, per-token halting, memory),
        but each step's attention reads its KV cache instead of recomputing the past.
        """
        if not state.caches:
            state.caches = self.new_caches(input_ids.size(0), input_ids.device)
        memory_on = self.cfg.mem_enabled  # generation reads memory at any length: it may run long
        out = self._refine_infer(input_ids, None, memory_on, state.memory_state, self.cfg.t_infer, state)
        state.memory_state = out.memory_state
        return out.logits

    def generate(self, input_ids: Tensor, max_new_tokens: int, **sampling) -> Tensor:
        """See `cognate.model.generate.generate` (greedy / temperature / top-p, KV cache, carried memory)."""
        return generate(self, input_ids, max_new_tokens, **sampling)

    def new_caches(self, batch_size: int, device) -> list[list[KVCache]]:
        dtype = self.embed_tokens.weight.dtype
        return [
            [
                KVCache.empty(batch_size, self.cfg.n_heads, self.cfg.head_dim, device, dtype)
                for _ in self.layers
            ]
            for _ in range(self.cfg.t_infer)
        ]

    # --- pieces -------------------------------------------------------------------------------------------------

    def _embed(self, input_ids: Tensor, start: int) -> tuple[Tensor, Rotary]:
        positions = torch.arange(start, start + input_ids.size(1), device=input_ids.device)
        rotary = Rotary.for_positions(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return self.embed_tokens(input_ids) * self.embed_scale, rotary

    def _head_loss(self, normed: Tensor, targets: Tensor, surprise_labels: Tensor | None):
        """The fused LM head + CE over [B, S] states (see cognate.model.head)."""
        return fused_linear_cross_entropy(
            normed.flatten(0, 1), self.lm_head.weight, targets.flatten(), surprise_labels
        )

    def _core(
        self, x: Tensor, rotary: Rotary, bank: MemoryBank | None, caches: list[KVCache] | None = None
    ) -> Tensor:
        """One refinement step: every block, then RMS normalisation of the state.

        Normalising the carried state keeps its scale the same after 2 steps or 16, which is what lets a model
        trained with t_train steps run with a different t_infer.
        """
        checkpointing = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if checkpointing:
                x = checkpoint(block, x, rotary, bank, use_reentrant=False)
            else:
                x = block(x, rotary, bank, caches[i] if caches is not None else None)
        return rms_normalize(x, self.cfg.norm_eps)

    def _output(
        self,
        logits: Tensor,
        losses: dict[str, Tensor],
        targets: Tensor | None,
        steps: Tensor,
        halt_probs: list[Tensor],
        valid: Tensor,
        banks: list[MemoryBank],
        loss_banks: list[MemoryBank],
    ) -> CognateOutput:
        cfg = self.cfg
        if loss_banks:
            losses["read"], losses["write"] = self.memory.losses(loss_banks, valid)
        else:
            losses["read"] = losses["write"] = _zero(losses["ref"])
        total = None
        if targets is not None:
            total = (
                losses["ref"]
                + cfg.w_act * losses["act"]
                + cfg.w_read * losses["read"]
                + cfg.w_write * losses["write"]
            )
        mean_steps, var_steps = step_statistics(steps, valid)
        mean_halt = torch.stack(halt_probs).mean() if halt_probs else _zero(losses["ref"])
        act = {"steps": steps, "mean_steps": mean_steps, "var_steps": var_steps, "mean_halt_prob": mean_halt}
        memory_state = self.memory.next_state(banks) if banks else None
        memory = self.memory.stats(banks) if banks else {}
        return CognateOutput(total, losses, logits, act, memory, memory_state)


def token_surprise(logits: Tensor, input_ids: Tensor, previous_logits: Tensor | None = None) -> Tensor:
    """Per-token surprise [B, S]: the CE of predicting input token i from position i - 1 (no labels needed).

    The first token is scored against `previous_logits` (the last position of the previous call) when given, else
    it is unknown (NaN; the memory averages a chunk's surprise over its known tokens). So a chunk's surprise is
    known as soon as its own tokens are, whether the sequence arrives at once or token by token in generation.
    """
    later = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none").float()
    if previous_logits is None:
        first = later.new_full((logits.size(0), 1), float("nan"))
    else:
        first = F.cross_entropy(previous_logits, input_ids[:, 0], reduction="none")[:, None].float()
    return torch.cat((first, later), dim=1).detach()


def next_token_labels(input_ids: Tensor) -> Tensor:
    """labels[:, i] = input_ids[:, i + 1]; the last position has no next token (IGNORE_INDEX)."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()


def _surprise_from_label_ce(label_ce: Tensor) -> Tensor:
    """`token_surprise` from the fused head's CE against `next_token_labels`: shifted one position right."""
    return F.pad(label_ce[:, :-1], (1, 0), value=float("nan"))


def _valid(input_ids: Tensor, targets: Tensor | None) -> Tensor:
    return targets != IGNORE_INDEX if targets is not None else torch.ones_like(input_ids, dtype=torch.bool)


def _zero(like: Tensor) -> Tensor:
    return like.new_zeros((), dtype=torch.float32)
