"""CognateModel: a causal transformer core applied T times (TRM-style refinement) with ACT halting and memory.

    e   = embed(x) · √d                                    token embedding, unit RMS
    h_0 = e
    h_t = core(h_{t-1} + e)                                 t = 1..T; core = blocks, then RMS normalisation
    logits_t = lm_head(final_norm(h_t))                     the prediction of step t
    q_t = sigmoid(halting(final_norm(h_t)))                 per-token halting probability (cognate.model.act)

Training runs T = `t_train` steps. Deep supervision matches inference: every step inference may answer from,
1..t_infer, carries a loss, and so do the last `grad_steps` steps; the steps in between run under no_grad (TRM's
trick: memory does not grow with T). With S = {1..t_infer} ∪ {t_train - grad_steps + 1..t_train},

    L_ref = (1/|S|) Σ_{t∈S} CE(logits_t, targets),    L_act = BCE(q_t, [CE_t <= CE_t_infer + act_tolerance]), t < t_infer.

Evaluation runs t_infer steps. A token halts after the first step t whose q_t passes `act_threshold`: its state h_t
is frozen and the later steps skip it — no block, LM head or halting head runs for it. Later tokens still attend
to it at those steps; its keys and values there are projected from its frozen step input h_t + e in every layer
(CALM's state propagation, Schuster et al. 2022; exact in each step's first layer, where that is the input). So a
token's cost is the steps it ran, and what this rule costs in loss against running every step is measured
(`cognate bench generate`, halting_loss_delta). Generation uses the same rule, token by token. In every block the
memory read of step t comes from a bank built from h_{t-1}. The data pipeline shifts labels (targets[:, i] is the
token after input_ids[:, i]); the model never does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cognate.model.act import HaltingHead, act_loss, first_halting_step, halting_targets, step_statistics
from cognate.model.config import CognateConfig
from cognate.model.generate import DecodeState, generate
from cognate.model.head import IGNORE_INDEX, fused_linear_cross_entropy
from cognate.model.layers import Block, KVCache, RMSNorm, Rotary, rms_normalize
from cognate.model.memory import LongTermMemory, MemoryBank, MemoryState
from cognate.model.neural_memory import NeuralMemory


@dataclass
class CognateOutput:
    loss: Tensor | None  # L_ref + w_act·L_act + w_read·L_read + w_write·L_write; None without targets
    # ref, act, read, write (0 when that part is off or there is nothing to score; act is 0 in evaluation, where
    # halted tokens never reach the step its target compares with)
    losses: dict[str, Tensor]
    # [B, S, V] final logits (in evaluation: each token's logits at its halting step). None when targets are given:
    # the fused head computes the loss without materialising them.
    logits: Tensor | None
    act: dict[str, Tensor]  # steps [B, S] (halting step per token), mean_steps, var_steps, mean_halt_prob
    memory: dict[str, Tensor]  # the memory's statistics for this call (empty when memory is off)
    # The memory after this call, to pass to the next call that continues the sequence; None when memory is off.
    memory_state: MemoryState | None
    # In evaluation with targets: per step 1..n_steps, each token's CE [B, S] after that step (a halted token's at
    # its halting step; 0 where the target is ignored); the last one's mean over scored tokens is L_ref. Else empty.
    step_losses: list[Tensor]


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
        # Only the configured memory kind's tensors (mem_kind is a size field: a specialization keeps it).
        self.memory = LongTermMemory(cfg) if cfg.mem_kind == "slots" else NeuralMemory(cfg)
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
        # Memory runs at every length, as in `decode`: a length threshold would make position i's output depend on
        # how many tokens follow it (docs/memory.md, "One function of the prefix").
        memory_on = cfg.mem_enabled
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
        answer_step = min(cfg.t_infer, n_steps)  # the deepest step inference answers from
        fused = targets is not None  # the loss without materialising logits (see cognate.model.head)
        valid = _valid(input_ids, targets)
        n_valid = valid.sum().clamp_min(1)
        h, surprise, logits = e, None, None
        banks, grad_banks = [], []
        ref_losses, halt_logits, halt_probs, step_ce = [], [], [], []
        for step in range(1, n_steps + 1):
            supervised = step <= answer_step or step > n_steps - cfg.grad_steps
            with contextlib.nullcontext() if supervised else torch.no_grad():
                bank = self.memory.build(step, h, surprise, memory_state) if memory_on else None
                h = self._core(h + e, rotary, bank)
                normed = self.norm(h)
                if cfg.act_enabled and step < answer_step:
                    halt_logits.append(self.halting(normed))
                    halt_probs.append(torch.sigmoid(halt_logits[-1].detach()))
                if fused and supervised:
                    head = self._head_loss(normed, targets)
                elif supervised:
                    logits = self.lm_head(normed)
            if bank is not None:
                banks.append(bank)
                if supervised:
                    grad_banks.append(bank)
                surprise = token_surprise(normed, input_ids, self.lm_head.weight)
            if fused and supervised:
                ref_losses.append(head.loss_sum / n_valid)
            if fused and step <= answer_step:
                step_ce.append(head.target_ce.view_as(targets))
        steps = (
            first_halting_step(halt_probs, cfg.act_threshold, answer_step)
            if halt_probs
            else torch.full_like(input_ids, answer_step)
        )
        losses = {"ref": torch.stack(ref_losses).mean() if ref_losses else _zero(e), "act": _zero(e)}
        if fused and halt_logits:
            losses["act"] = act_loss(halt_logits, halting_targets(step_ce, cfg.act_tolerance), valid)
        mean_halt = torch.stack(halt_probs).mean() if halt_probs else _zero(e)
        return self._output(logits, losses, targets, steps, mean_halt, valid, banks, grad_banks, [])

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
        """Evaluation with per-token halting (see the module docstring); with `decode`, the incremental form
        generation uses.

        Each step runs the blocks and the halting head only for the tokens still refining (`rows`, indices into the
        flattened B·S tokens); what a halted token had at its halting step (its state, its CE) stays in place, and
        its memory surprise and final logits are read from that state. Without targets the LM head runs once, on
        every token's final state; with targets the fused head scores every step and no logits are materialised.
        """
        cfg = self.cfg
        e, rotary = self._embed(input_ids, start=decode.position if decode else 0)
        fused = targets is not None
        flat_targets = targets.flatten() if fused else None
        valid = _valid(input_ids, targets)
        n_valid = valid.sum().clamp_min(1)
        n_tokens = input_ids.numel()
        rows = torch.arange(n_tokens, device=input_ids.device)  # the tokens still refining
        steps = torch.full((n_tokens,), n_steps, dtype=torch.long, device=input_ids.device)
        token_ce = e.new_zeros(n_tokens, dtype=torch.float32)  # fused: each token's CE at its latest step
        h, surprise = e, None
        banks, last_states, halt_probs, step_losses = [], [], [], []
        for step in range(1, n_steps + 1):
            bank = None
            if memory_on:
                bank = self.memory.build(
                    step, h, surprise, memory_state, read=bool(rows.numel()), for_loss=fused
                )
                banks.append(bank)
            caches = decode.caches[step - 1] if decode else None
            refined = self._core(h + e, rotary, bank, caches, rows)
            h = h.flatten(0, 1).index_copy(0, rows, refined.to(h.dtype)).view_as(h)
            normed = self.norm(refined)
            if fused:
                head = fused_linear_cross_entropy(normed, self.lm_head.weight, flat_targets[rows])
                token_ce = token_ce.index_copy(0, rows, head.target_ce)
                step_losses.append(token_ce.view_as(input_ids))
            if bank is not None and step < n_steps:  # the surprise the next step's memory writes with
                # Every token's latest state: a halted token keeps the one of its halting step.
                states = self.norm(h)
                previous = decode.last_states[step - 1] if decode and decode.last_states else None
                surprise = token_surprise(states, input_ids, self.lm_head.weight, previous)
                last_states.append(states[:, -1])
            if cfg.act_enabled and step < n_steps and rows.numel():
                q = torch.sigmoid(self.halting(normed))
                halt_probs.append(q)
                stops = q > cfg.act_threshold
                steps[rows[stops]] = step
                rows = rows[~stops]
        # One readout of every token's final (for a halted one, frozen) state.
        logits = None if fused else self.lm_head(self.norm(h))
        if decode is not None:
            decode.position += input_ids.size(1)
            decode.last_states = last_states
        losses = {"ref": token_ce.sum() / n_valid if fused else _zero(e), "act": _zero(e)}
        mean_halt = torch.cat(halt_probs).mean() if halt_probs else _zero(e)
        steps = steps.view_as(input_ids)
        loss_banks = banks if fused else []
        return self._output(logits, losses, targets, steps, mean_halt, valid, banks, loss_banks, step_losses)

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

    def _head_loss(self, normed: Tensor, targets: Tensor):
        """The fused LM head + CE over [B, S] states (see cognate.model.head)."""
        return fused_linear_cross_entropy(normed.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def _core(
        self,
        x: Tensor,
        rotary: Rotary,
        bank: MemoryBank | None,
        caches: list[KVCache] | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """One refinement step: every block, then RMS normalisation of the state.

        Normalising the carried state keeps its scale the same after 2 steps or 16, which is what lets a model
        trained with t_train steps run with a different t_infer. With `rows` (the tokens still refining, as
        indices into the flattened B·S tokens) only those are refined and returned, [n, D]; see `Block`.
        """
        checkpointing = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if checkpointing:
                x = checkpoint(block, x, rotary, bank, use_reentrant=False)
            else:
                x = block(x, rotary, bank, caches[i] if caches is not None else None, rows)
        if rows is not None:
            x = x.flatten(0, 1).index_select(0, rows)
        return rms_normalize(x, self.cfg.norm_eps)

    def _output(
        self,
        logits: Tensor,
        losses: dict[str, Tensor],
        targets: Tensor | None,
        steps: Tensor,
        mean_halt: Tensor,
        valid: Tensor,
        banks: list[MemoryBank],
        loss_banks: list[MemoryBank],
        step_losses: list[Tensor],
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
        act = {"steps": steps, "mean_steps": mean_steps, "var_steps": var_steps, "mean_halt_prob": mean_halt}
        memory_state = self.memory.next_state(banks) if banks else None
        memory = self.memory.stats(banks) if banks else {}
        return CognateOutput(total, losses, logits, act, memory, memory_state, step_losses)


def token_surprise(
    states: Tensor, input_ids: Tensor, head_weight: Tensor, previous_state: Tensor | None = None
) -> Tensor:
    """Per-token surprise [B, S] in [0, 1], from one refinement step's normalised states [B, S, D]: how far the
    state at position i - 1 points from the LM-head row of the token that came at i,

        surprise_i = (1 - cos(states_{i-1}, W_head[x_i])) / 2.

    It is the true token's logit with the norms and the softmax normaliser left out: 2·D FLOPs per token instead
    of the full-vocabulary head (2·D·V) that the cross-entropy needs, so no step runs the head only for the memory
    (docs/memory.md, "Write policy and eviction", measures it against the cross-entropy). The first token is scored
    against `previous_state` [B, D] (the last position of the previous call) when given, else it is unknown (NaN;
    the memory averages a chunk's surprise over its known tokens), so a chunk's surprise is the same whether the
    sequence arrives at once or token by token.
    """
    with torch.no_grad():
        if previous_state is not None:
            states = torch.cat([previous_state[:, None].to(states.dtype), states], dim=1)
        else:
            states = F.pad(states, (0, 0, 1, 0), value=float("nan"))
        rows = F.normalize(head_weight[input_ids].float(), dim=-1)
        alignment = (F.normalize(states[:, :-1].float(), dim=-1) * rows).sum(-1)
        return (1.0 - alignment) / 2.0


def _valid(input_ids: Tensor, targets: Tensor | None) -> Tensor:
    return targets != IGNORE_INDEX if targets is not None else torch.ones_like(input_ids, dtype=torch.bool)


def _zero(like: Tensor) -> Tensor:
    return like.new_zeros((), dtype=torch.float32)
