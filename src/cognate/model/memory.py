"""Titans-style long-term memory: per-sequence slots written chunk by chunk and read by cross-attention.

One refinement step t builds one `MemoryBank` from the previous step's states h_{t-1}; every block of step t reads
it. Everything is computed for all chunks and tokens at once; there is no Python loop over tokens or chunks.

Write. The states are cut into chunks of `mem_chunk_size` tokens at absolute positions. Each complete chunk proposes
one slot: an attention-pooled summary of its states projected to a key and a value of width `mem_dim`. Its write
strength is surprise x novelty x a learned write gate:
  surprise = the mean over the chunk's tokens of (1 - cos(state of step t-1 at i - 1, LM-head row of token i)) / 2,
             how far step t-1's prediction points from what came (cognate.model.model.token_surprise),
  novelty  = 1 - the largest cosine similarity of its key to the keys written before it (clamped to [0, 1]),
  gate     = sigmoid(w . summary + b), trained by L_write.

Forget and evict. Strength decays by `mem_decay` per chunk. All slots decay at the same rate, so two slots never
change order once both exist: "keep the `mem_capacity` strongest" is one fixed ranking, an evicted slot never comes
back, and the slots alive when chunk c reads are the top-capacity by that ranking among slots from chunks < c.
A cumulative count over the ranking gives the visibility of every slot to every query chunk, [B, n_chunks, n_slots].
`LongTermMemory.eviction = "fifo"` replaces the rule by "keep the newest" (every chunk written with strength 1, ties
to the newer slot), to measure what the write policy buys with the same weights.

Read. Each token scores the slots visible to its chunk by content alone (cosine of a read query made from its own
h_{t-1} with the slot keys) and keeps the top `mem_topk`. Strength decides which slots are alive, not which are
read: it is a write-time salience estimate, and as a log prior it swamped the bounded cosine logits. Every block
then cross-attends to the kept slots with its own q/k/v/o projections, with the selection's log-probabilities added
to its attention logits, and a learned gate (memory-as-gate, MAG) mixes the read into the residual stream.

Losses (both bounded, both with gradients to the memory's parameters):
  L_read  InfoNCE over the visible slots, on the cosine logits of the read queries. A token's positive is the
          visible slot whose value best matches the token's target representation, i.e. the (projected, detached)
          state of the next token: "the slot that holds what comes next". Bounded by log(n_slots) + 2 / temperature.
  L_write squared error between a slot's learned write gate and its utility (detached): the largest share of
          any later token's read that the slot gets when nothing of this call is evicted, i.e. top-k over every
          slot written before the reader's chunk. A slot that eviction removed but that a later read would have
          used is pushed up, so the gate (and through it the strength) learns to keep what reads use; measuring
          the use after eviction instead would never bring back an evicted slot. Bounded by 1.

Carrying memory between calls (generation, long documents): `MemoryState` keeps, per refinement step, the alive
slots, their strengths and the states of the trailing incomplete chunk, which the next call's `build` prepends so
that chunks always sit at absolute positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cognate.model.config import CognateConfig

# Temperature of the read queries' cosine logits. Fixed, as in SimCLR-style InfoNCE, so the logits (and L_read)
# stay bounded; the blocks' own attention sharpens the read further.
RETRIEVAL_TEMPERATURE = 0.1


@dataclass
class MemoryState:
    """Memory carried explicitly from one call to the next; per sequence and per refinement step."""

    keys: Tensor  # [T, B, capacity, mem_dim]
    values: Tensor  # [T, B, capacity, mem_dim]
    strength: Tensor  # [T, B, capacity], as seen by chunk `next_chunk`; 0 = empty slot
    next_chunk: int  # absolute index of the next chunk to be written
    pending_states: Tensor  # [T, B, r, d_model]: h_{t-1} of the r < chunk_size tokens of the incomplete chunk
    pending_surprise: Tensor  # [T, B, r]: their surprise, NaN where unknown

    @property
    def n_steps(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def detach(self) -> MemoryState:
        return replace(
            self,
            keys=self.keys.detach(),
            values=self.values.detach(),
            strength=self.strength.detach(),
            pending_states=self.pending_states.detach(),
            pending_surprise=self.pending_surprise.detach(),
        )

    def select(self, batch_indices: Tensor | list[int]) -> MemoryState:
        """The memory of some sequences of the batch (e.g. the unfinished ones during generation)."""
        index = torch.as_tensor(batch_indices, dtype=torch.long, device=self.keys.device)
        return replace(
            self,
            keys=self.keys[:, index],
            values=self.values[:, index],
            strength=self.strength[:, index],
            pending_states=self.pending_states[:, index],
            pending_surprise=self.pending_surprise[:, index],
        )

    def reset(self, sequences: Tensor) -> MemoryState:
        """The memory with the sequences marked in `sequences` ([B] bool) emptied and the others kept: batch rows
        that start a new document while the others continue theirs. Needs no pending tokens (they would be
        prepended to every row): a batch whose rows are whole chunks, as a row length divisible by the chunk size
        gives."""
        check_no_pending(self.pending_states)
        keep = ~sequences.to(device=self.keys.device, dtype=torch.bool)
        return replace(
            self,
            keys=self.keys * keep[None, :, None, None],
            values=self.values * keep[None, :, None, None],
            strength=self.strength * keep[None, :, None],
        )


def check_no_pending(pending_states: Tensor) -> None:
    """A carried state whose single sequences may be emptied holds no pending tokens ([T, B, r, d_model]): they
    would be prepended to every row of the next call, whichever document it starts."""
    if pending_states.shape[2]:
        raise ValueError(
            f"cannot empty single sequences of a memory state holding {pending_states.shape[2]} pending "
            "tokens: make the row length a multiple of mem_chunk_size"
        )


@dataclass
class MemoryBank:
    """The memory one refinement step reads: slots plus, per query token, which of them it reads and how much."""

    keys: Tensor  # [B, n_slots, mem_dim]: the prior's slots first, then one per complete chunk of this call
    values: Tensor  # [B, n_slots, mem_dim]
    read_bias: Tensor  # [B, S, n_slots]: log-probability of each selected slot; -inf for the others
    reads: Tensor  # [B, S, 1]: 1.0 where the token reads at least one slot, else 0.0
    visible: Tensor  # [B, S, n_slots] bool: alive and written from a chunk strictly before the token's
    earlier: Tensor  # [B, S, n_slots] bool: written from a strictly earlier chunk, alive or evicted
    # What the losses, the statistics and the next state need.
    retrieval: Tensor  # [B, S, n_slots]: the read queries' cosine logits (InfoNCE logits)
    positive: Tensor  # [B, S]: slot index of each token's L_read positive; -1 where it has none
    write_logit: Tensor  # [B, n_new]: learned write-gate logits of this call's chunks
    topk: int  # slots each token reads
    kept: Tensor  # [B, n_new] bool: the slot was written and survived eviction when it was written
    alive_at_end: Tensor  # [B, n_slots] bool: alive after this call's last complete chunk
    rank_key: Tensor  # [B, n_slots] float32: log strength up to a per-chunk constant (-inf: never written)
    n_new: int  # complete chunks in this call (pending tokens included)
    next_chunk: int  # absolute index of the first chunk not yet written after this call
    pending_states: Tensor  # [B, r, d_model]
    pending_surprise: Tensor  # [B, r]
    gate_means: list[Tensor] = field(default_factory=list)  # mean MAG gate of each block that read this bank

    @property
    def n_slots(self) -> int:
        return self.keys.shape[1]


EVICTION_RULES = ("strength", "fifo")


class LongTermMemory(nn.Module):
    """The write controller, the slot projections and the read-query scorer; one per model.

    eviction: "strength" (the write policy: the weakest slot goes) or "fifo" (keep the newest `mem_capacity`
    chunks, every chunk written; an evaluation control that ignores surprise, novelty and the learned gate).
    """

    def __init__(self, cfg: CognateConfig, eviction: str = "strength"):
        super().__init__()
        self.cfg = cfg
        self.eviction = eviction
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # Which tokens of a chunk its slot summarises (no bias: the softmax over a chunk ignores it).
        self.pool_score = nn.Linear(cfg.d_model, 1, bias=False)
        self.key = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)
        self.value = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)
        self.write_gate = nn.Linear(cfg.d_model, 1)
        self.query = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)

    def empty_state(self, n_steps: int, batch_size: int, device, dtype) -> MemoryState:
        c = self.cfg
        return MemoryState(
            keys=torch.zeros(n_steps, batch_size, c.mem_capacity, c.mem_dim, device=device, dtype=dtype),
            values=torch.zeros(n_steps, batch_size, c.mem_capacity, c.mem_dim, device=device, dtype=dtype),
            strength=torch.zeros(n_steps, batch_size, c.mem_capacity, device=device, dtype=torch.float32),
            next_chunk=0,
            pending_states=torch.zeros(n_steps, batch_size, 0, c.d_model, device=device, dtype=dtype),
            pending_surprise=torch.zeros(n_steps, batch_size, 0, device=device, dtype=torch.float32),
        )

    def build(
        self,
        step: int,
        states: Tensor,
        surprise: Tensor | None,
        prior: MemoryState | None,
        *,
        read: bool = True,
        for_loss: bool = True,
    ) -> MemoryBank:
        """The memory that refinement step `step` (1-based) reads.

        states: [B, S, d_model], h_{step-1} of this call's tokens (the embeddings at step 1).
        surprise: [B, S] in [0, 1], detached: how far step step-1's prediction (made at the position before each
            input token) missed it (`token_surprise`); None at step 1 (no prediction yet: full surprise). NaN
            marks an unknown value (a call's first token when nothing came before it); a chunk's surprise is the
            mean over its known tokens.
        prior: the memory carried in from the previous call, or None for a fresh sequence.
        read: False when no token of this call reads the bank (every token has halted before this step): only what
            the next state needs is computed (the writes, eviction and pending tokens); the read fields are empty.
        for_loss: False when `losses` will not be asked for this bank (inference without targets): no L_read
            positives (every `positive` is -1).
        """
        c = self.cfg
        batch, seq_len, _ = states.shape
        if surprise is None:
            surprise = states.new_full((batch, seq_len), float("nan"), dtype=torch.float32)
        if prior is not None and not 1 <= step <= prior.n_steps:
            raise ValueError(
                f"memory state holds {prior.n_steps} refinement steps; step {step} was asked for"
            )
        if prior is not None and prior.batch_size != batch:
            raise ValueError(f"memory state holds {prior.batch_size} sequences but the batch has {batch}")

        # This call's chunks start right after the prior's last complete chunk: prepend its pending tokens.
        first_chunk = prior.next_chunk if prior is not None else 0
        if prior is not None and prior.pending_states.shape[2]:
            all_states = torch.cat([prior.pending_states[step - 1].to(states.dtype), states], dim=1)
            all_surprise = torch.cat([prior.pending_surprise[step - 1], surprise.float()], dim=1)
        else:
            all_states, all_surprise = states, surprise.float()
        n_pending = all_states.shape[1] - seq_len
        n_new = all_states.shape[1] // c.mem_chunk_size
        complete = n_new * c.mem_chunk_size
        if not read and n_new == 0:  # e.g. a halted token in generation: it only joins the pending chunk
            return self._pending_only(step, prior, all_states, all_surprise, first_chunk, seq_len)

        normed = self.norm(all_states)
        new_keys, new_values, write_logit = self._propose(normed[:, :complete])
        if prior is not None:
            prior_keys, prior_values = prior.keys[step - 1], prior.values[step - 1]
            prior_strength = prior.strength[step - 1].float()
        else:
            prior_keys = new_keys.new_zeros(batch, 0, c.mem_dim)
            prior_values, prior_strength = prior_keys, new_keys.new_zeros(batch, 0, dtype=torch.float32)
        keys = torch.cat([prior_keys.to(new_keys.dtype), new_keys], dim=1)
        values = torch.cat([prior_values.to(new_values.dtype), new_values], dim=1)
        n_prior = prior_keys.shape[1]

        if self.eviction == "fifo":
            strength = torch.ones_like(write_logit, dtype=torch.float32)
        elif self.eviction == "strength":
            chunk_surprise = _chunk_surprise(all_surprise[:, :complete], n_new, c.mem_chunk_size)
            novelty = _novelty(new_keys.detach(), prior_keys.detach(), prior_strength > 0)
            strength = chunk_surprise * novelty * torch.sigmoid(write_logit.float())
        else:
            raise ValueError(f"eviction={self.eviction!r}; choose one of: {', '.join(EVICTION_RULES)}")
        rank_key = torch.cat([_log_strength(prior_strength), _new_rank_key(strength, c.mem_decay)], dim=1)

        # Visibility of every slot to every query chunk of this call (chunk indices relative to first_chunk).
        n_query_chunks = (all_states.shape[1] + c.mem_chunk_size - 1) // c.mem_chunk_size
        count_stronger = _count_stronger_before(rank_key)  # [B, n_slots + 1, n_slots]
        written = rank_key > float("-inf")
        slot_chunk = torch.cat(
            [
                torch.full((n_prior,), -1, device=keys.device),
                torch.arange(n_new, device=keys.device),
            ]
        )
        query_chunk = torch.arange(n_query_chunks, device=keys.device)
        earlier_chunk = written[:, None, :] & (slot_chunk[None, :] < query_chunk[:, None])
        visible_chunk = earlier_chunk & (count_stronger[:, n_prior + query_chunk] < c.mem_capacity)
        token_chunk = torch.arange(n_pending, n_pending + seq_len, device=keys.device) // c.mem_chunk_size
        visible = visible_chunk[:, token_chunk]  # [B, S, n_slots]

        if read:
            retrieval, read_bias, reads = self._select(normed[:, n_pending:], keys, visible)
        else:
            visible = visible & False
            retrieval = read_bias = visible.new_zeros(visible.shape, dtype=torch.float32)
            reads = states.new_zeros(batch, seq_len, 1)
        if read and for_loss:
            positive = self._positives(normed[:, n_pending:], values, visible)
        else:
            positive = visible.new_full((batch, seq_len), -1, dtype=torch.long)
        kept = written[:, n_prior:] & (
            torch.diagonal(count_stronger[:, n_prior + 1 :, n_prior:], dim1=1, dim2=2) < c.mem_capacity
        )
        alive_at_end = written & (count_stronger[:, n_prior + n_new] < c.mem_capacity)
        return MemoryBank(
            keys=keys,
            values=values,
            read_bias=read_bias,
            reads=reads,
            visible=visible,
            earlier=earlier_chunk[:, token_chunk],
            retrieval=retrieval,
            positive=positive,
            write_logit=write_logit,
            topk=c.mem_topk,
            kept=kept,
            alive_at_end=alive_at_end,
            rank_key=rank_key,
            n_new=n_new,
            next_chunk=first_chunk + n_new,
            pending_states=all_states[:, complete:],
            pending_surprise=all_surprise[:, complete:],
        )

    def _pending_only(
        self,
        step: int,
        prior: MemoryState | None,
        all_states: Tensor,
        all_surprise: Tensor,
        first_chunk: int,
        seq_len: int,
    ) -> MemoryBank:
        """The bank of a call that completes no chunk and that no token reads: the prior's slots unchanged, the
        call's states pending. What `build` computes in that case, without the ranking and the read selection."""
        batch = all_states.shape[0]
        if prior is not None:
            keys, values = (
                prior.keys[step - 1].to(all_states.dtype),
                prior.values[step - 1].to(all_states.dtype),
            )
            strength = prior.strength[step - 1].float()
        else:
            keys = values = all_states.new_zeros(batch, 0, self.cfg.mem_dim)
            strength = all_states.new_zeros(batch, 0, dtype=torch.float32)
        n_slots = keys.shape[1]
        no_read = torch.zeros(batch, seq_len, n_slots, dtype=torch.bool, device=keys.device)
        zeros = no_read.float()
        return MemoryBank(
            keys=keys,
            values=values,
            read_bias=zeros,
            reads=all_states.new_zeros(batch, seq_len, 1),
            visible=no_read,
            earlier=no_read,
            retrieval=zeros,
            positive=torch.full((batch, seq_len), -1, dtype=torch.long, device=keys.device),
            write_logit=zeros.new_zeros(batch, 0),
            topk=self.cfg.mem_topk,
            kept=no_read.new_zeros(batch, 0),
            alive_at_end=strength > 0,
            rank_key=_log_strength(strength),
            n_new=0,
            next_chunk=first_chunk,
            pending_states=all_states,
            pending_surprise=all_surprise,
        )

    def _propose(self, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One slot proposal per complete chunk of the normalised states: its key, value and write-gate logit."""
        batch, length, d_model = normed.shape
        chunks = normed.view(batch, length // self.cfg.mem_chunk_size, self.cfg.mem_chunk_size, d_model)
        weights = torch.softmax(self.pool_score(chunks).squeeze(-1).float(), dim=-1).to(chunks.dtype)
        summary = torch.einsum("bnl,bnld->bnd", weights, chunks)
        return self.key(summary), self.value(summary), self.write_gate(summary).squeeze(-1)

    def _select(self, normed: Tensor, keys: Tensor, visible: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each token's top-k visible slots by content: (cosine logits, log read-probabilities, reads mask).

        Strength is deliberately left out of the score. Its log (surprise x novelty x gate) spans ~10 nats between
        slots, mostly from novelty between similar keys, against cosine logits bounded by 1 / temperature: as a
        prior it decided which slots were read and kept the source out of the top-k (docs/memory.md, "Evidence").
        Strength already acts through eviction.
        """
        query = F.normalize(self.query(normed).float(), dim=-1)
        retrieval = query @ F.normalize(keys.float(), dim=-1).transpose(1, 2) / RETRIEVAL_TEMPERATURE
        read_bias, reads = _top_k_read(retrieval, visible, self.cfg.mem_topk)
        return retrieval, read_bias, reads.to(normed.dtype)

    @torch.no_grad()
    def _positives(self, normed: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """L_read positive of each token: the visible slot whose value best matches the next token's state."""
        if values.shape[1] == 0:
            return visible.new_full(visible.shape[:2], -1, dtype=torch.long)
        target = F.normalize(self.value(normed[:, 1:]).float(), dim=-1)
        match = target @ F.normalize(values.float(), dim=-1).transpose(1, 2)
        match = match.masked_fill(~visible[:, :-1], float("-inf"))
        positive = match.argmax(dim=-1)
        # One visible slot makes a trivial contrast; the last token has no next token in this call.
        has_contrast = visible[:, :-1].sum(-1) >= 2
        positive = positive.masked_fill(~has_contrast, -1)
        return F.pad(positive, (0, 1), value=-1)

    def losses(self, banks: list[MemoryBank], scored: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_read, L_write) averaged over the given banks (the refinement steps that carry gradients).

        scored: [B, S] bool, the tokens that have a target (padding and document boundaries have none); only their
        reads teach the read queries and count as a slot's use. None: every token.
        """
        if not banks:
            zero = torch.zeros((), device=self.key.weight.device)
            return zero, zero
        read = torch.stack([_read_loss(bank, scored) for bank in banks]).mean()
        write = torch.stack([_write_loss(bank, scored) for bank in banks]).mean()
        return read, write

    def next_state(self, banks: list[MemoryBank]) -> MemoryState:
        """The memory after this call's complete chunks; `banks` holds one bank per refinement step, in order."""
        c = self.cfg
        keys, values, strengths = [], [], []
        for bank in banks:
            alive_key = bank.rank_key.masked_fill(~bank.alive_at_end, float("-inf"))
            k = min(c.mem_capacity, bank.n_slots)
            _, index = alive_key.topk(k, dim=-1)
            # Slots stay in write order (oldest first), so equal strengths still break ties towards the newer slot.
            index = index.sort(dim=-1).values
            top_key = alive_key.gather(1, index)
            pad = c.mem_capacity - k
            # Strength as seen by the next chunk: rank_key is log strength as seen by this call's first chunk.
            strength = torch.exp(top_key + bank.n_new * math.log(c.mem_decay))
            strengths.append(F.pad(strength, (0, pad)))
            gather = index[..., None].expand(-1, -1, c.mem_dim)
            filled = (strength > 0)[..., None]
            keys.append(F.pad(bank.keys.gather(1, gather) * filled, (0, 0, 0, pad)))
            values.append(F.pad(bank.values.gather(1, gather) * filled, (0, 0, 0, pad)))
        return MemoryState(
            keys=torch.stack(keys),
            values=torch.stack(values),
            strength=torch.stack(strengths),
            next_chunk=banks[-1].next_chunk,
            pending_states=torch.stack([bank.pending_states for bank in banks]),
            pending_surprise=torch.stack([bank.pending_surprise for bank in banks]),
        )

    def stats(self, banks: list[MemoryBank]) -> dict[str, Tensor]:
        """Write rate (proposed chunks that got a slot), mean MAG read gate, slots alive after the call."""
        device = self.key.weight.device
        kept = torch.cat([bank.kept.flatten() for bank in banks]) if banks else torch.zeros(0, device=device)
        gates = [g for bank in banks for g in bank.gate_means]
        alive = [bank.alive_at_end.sum(-1).float().mean() for bank in banks]
        return {
            "write_rate": kept.float().mean() if kept.numel() else torch.zeros((), device=device),
            "read_gate": torch.stack(gates).float().mean() if gates else torch.zeros((), device=device),
            "slots_used": torch.stack(alive).mean() if alive else torch.zeros((), device=device),
        }


class MemoryRead(nn.Module):
    """Memory cross-attention of one block: reads the bank's selected slots, mixed in by a learned gate (MAG)."""

    def __init__(self, cfg: CognateConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.query = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.key = nn.Linear(cfg.mem_dim, cfg.d_model, bias=False)
        self.value = nn.Linear(cfg.mem_dim, cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model)
        # The core's (GPT-2) scheme: N(0, 0.02), the projection into the residual stream scaled down by depth.
        for linear in (self.query, self.key, self.value, self.gate):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: Tensor, bank: MemoryBank | None, rows: Tensor | None = None) -> Tensor:
        """The residual update for x [B, S, d_model], or for the tokens `rows` of the flattened [B·S] batch,
        x [n, d_model] (only theirs is computed); zeros when there is no memory to read."""
        if bank is None or bank.n_slots == 0:
            return torch.zeros_like(x)
        batch, seq_len = bank.read_bias.shape[:2]
        d_model = x.size(-1)
        h = self.norm(x)
        q = self.query(h).reshape(-1, d_model)
        if rows is not None:  # slots are read per sequence: place the rows' queries in the [B, S] layout
            q = q.new_zeros(batch * seq_len, d_model).index_copy(0, rows, q)
        q = q.view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
        k = self.key(bank.keys).view(batch, bank.n_slots, self.n_heads, -1).transpose(1, 2)
        v = self.value(bank.values).view(batch, bank.n_slots, self.n_heads, -1).transpose(1, 2)
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=bank.read_bias[:, None].to(q.dtype))
        read, reads = read.transpose(1, 2).reshape(batch * seq_len, d_model), bank.reads.reshape(-1, 1)
        if rows is not None:
            read, reads = read.index_select(0, rows), reads.index_select(0, rows)
        read = self.out(read).view_as(x)
        gate = torch.sigmoid(self.gate(h))
        bank.gate_means.append(gate.detach().mean())
        return gate * read * reads.view(*x.shape[:-1], 1).to(read.dtype)


def _top_k_read(retrieval: Tensor, candidates: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Each token's read of its candidate slots: the top-k by retrieval logit, as log-probabilities (-inf for the
    others), and [B, S, 1] whether it reads anything."""
    score = retrieval.masked_fill(~candidates, float("-inf"))
    top_score, top_index = score.topk(min(topk, retrieval.shape[-1]), dim=-1)
    selected = torch.full_like(score, float("-inf")).scatter(-1, top_index, top_score)
    reads = candidates.any(dim=-1, keepdim=True)
    # A token that sees no slot reads nothing; a finite row keeps the softmax free of NaNs (its read is zeroed).
    return torch.log_softmax(selected.masked_fill(~reads, 0.0), dim=-1), reads


def _chunk_surprise(surprise: Tensor, n_chunks: int, chunk_size: int) -> Tensor:
    """The mean token surprise of each chunk, in [0, 1]; 1.0 for a chunk whose surprise is unknown."""
    return surprise.view(surprise.shape[0], n_chunks, chunk_size).nanmean(dim=-1).nan_to_num(1.0)


def _novelty(new_keys: Tensor, prior_keys: Tensor, prior_alive: Tensor) -> Tensor:
    """1 - max cosine similarity of each proposal to the prior's live slots and to this call's earlier proposals.

    Earlier proposals count whether or not they survived eviction: their survival depends on their own strength,
    and skipping that dependency is what lets every chunk be scored at once.
    """
    n_new = new_keys.shape[1]
    if n_new == 0:
        return new_keys.new_ones(new_keys.shape[:2], dtype=torch.float32)
    keys = F.normalize(torch.cat([prior_keys.to(new_keys.dtype), new_keys], dim=1).float(), dim=-1)
    similarity = F.normalize(new_keys.float(), dim=-1) @ keys.transpose(1, 2)  # [B, n_new, n_prior + n_new]
    earlier = torch.ones(n_new, n_new, dtype=torch.bool, device=keys.device).tril(diagonal=-1)
    before = torch.cat(
        [prior_alive[:, None, :].expand(-1, n_new, -1), earlier.expand(len(keys), -1, -1)], dim=2
    )
    max_similarity = similarity.masked_fill(~before, float("-inf")).amax(dim=-1)
    return 1.0 - max_similarity.clamp(min=0.0)


def _new_rank_key(strength: Tensor, decay: float) -> Tensor:
    """log of each new slot's strength as seen by the call's first chunk (a constant shift of every slot's).

    Slot j (0-based within the call) has strength w_j * decay^(c - j - 1) when chunk c reads it, and a prior slot
    s * decay^c; both are (key) + c * log(decay), so the keys order the slots identically for every chunk c.
    """
    chunk = torch.arange(strength.shape[1], device=strength.device, dtype=torch.float32)
    return _log_strength(strength) - (chunk + 1.0) * math.log(decay)


def _log_strength(strength: Tensor) -> Tensor:
    """log(strength), -inf for an empty slot, with a zero (not NaN) gradient there."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(strength > 0, strength.clamp(min=tiny).log(), float("-inf"))


def _count_stronger_before(rank_key: Tensor) -> Tensor:
    """[B, n_slots + 1, n_slots]: entry (m, j) counts the written slots i < m that outrank slot j.

    Slot order is write order, so a query chunk's candidates are a prefix of the slots and its count is one row;
    slot j is alive there when fewer than `capacity` candidates outrank it. Ties go to the newer slot.
    """
    n_slots = rank_key.shape[1]
    index = torch.arange(n_slots, device=rank_key.device)
    ri, rj = rank_key[:, :, None], rank_key[:, None, :]
    outranks = ((ri > rj) | ((ri == rj) & (index[:, None] > index[None, :]))) & (ri > float("-inf"))
    return F.pad(outranks.int().cumsum(dim=1), (0, 0, 1, 0))


def _read_loss(bank: MemoryBank, scored: Tensor | None) -> Tensor:
    """InfoNCE of the read queries' cosine logits over the visible slots against each token's positive."""
    if bank.n_slots == 0:
        return bank.retrieval.sum() * 0.0
    has_positive = bank.positive >= 0 if scored is None else (bank.positive >= 0) & scored
    # Rows without a positive get finite dummy logits (zeroed out below) so that nothing turns into NaN.
    logits = bank.retrieval.masked_fill(~bank.visible, float("-inf"))
    logits = torch.where(has_positive[..., None], logits, 0.0)
    loss = F.cross_entropy(logits.transpose(1, 2), bank.positive.clamp(min=0), reduction="none")
    return (loss * has_positive).sum() / has_positive.sum().clamp(min=1)


def _write_loss(bank: MemoryBank, scored: Tensor | None) -> Tensor:
    """Squared error between each new slot's learned write gate and its (detached) utility."""
    utility = _utility(bank, scored)
    used = ~utility.isnan()
    error = (torch.sigmoid(bank.write_logit.float()) - utility.nan_to_num(0.0)).square() * used
    return error.sum() / used.sum().clamp(min=1)


def _utility(bank: MemoryBank, scored: Tensor | None) -> Tensor:
    """Per new slot, the largest share of a later (scored) token's read it gets when nothing of this call is evicted
    (top-k over every slot written before the reader's chunk); NaN where no such token exists."""
    read_bias, _ = _top_k_read(bank.retrieval.detach(), bank.earlier, bank.topk)
    readers = bank.earlier if scored is None else bank.earlier & scored[..., None]
    n_prior = bank.n_slots - bank.n_new
    probability = read_bias.exp() * readers
    utility = probability[:, :, n_prior:].amax(dim=1)
    return utility.masked_fill(~readers[:, :, n_prior:].any(dim=1), float("nan"))
