"""Titans neural memory (Behrouz et al. 2025, arXiv 2501.00663): a small MLP written at test time by gradient steps.

`mem_kind="neural"` replaces the slot memory (cognate.model.memory) with this one. As there, one refinement step t
builds one `NeuralMemoryBank` from the previous step's states h_{t-1} (the embeddings at step 1), every block of
step t reads it, and each sequence of the batch has its own memory (per refinement step).

Memory. M_W(k) = W2ᵀ silu(W1ᵀ k), an MLP of width `mem_neural_hidden` on `mem_dim`-wide keys, whose weights
W = (W1, W2) are the memory's content. Each sequence starts from learned initial weights W_0.

Write. The states are cut into chunks of `mem_chunk_size` tokens at absolute positions. From each token's normalised
state n_i = RMSNorm(h_{t-1, i}):
    k_i = normalize(conv_K(W_K n)_i),  v_i = conv_V(W_V n)_i,  θ_i = sigmoid(w_θ · n_i + b_θ)   per token
    η_c = sigmoid(w_η · n̄_c + b_η),  α_c = sigmoid(w_α · n̄_c + b_α)                        per chunk (n̄_c: its mean)
Chunk c is written by one gradient step on the associative loss, taken at the weights W_c from the chunk's start
for all of its tokens at once (the paper's mini-batch formulation; the gradient is written in closed form):
    ℓ_c(W) = Σ_{i ∈ c} θ_i ‖M_W(k_i) − v_i‖²                  (θ_i weighs each token's write: the paper's θ_t)
    S_c     = η_c S_{c−1} − ∇_W ℓ_c(W_c) / (2 N_c)              momentum: the "surprise", past plus momentary
    W_{c+1} = (1 − α_c) W_c + S_c                               decay α: forgetting
with S_0 = 0. N_c = max(max_i E_i, Σ_i θ_i E_i) (detached) normalises the step as NLMS does: E_i bounds how far a
unit step on token i alone moves its own output (see `_associative_gradient`), so θ_i = 1 on one token writes its
association about fully, and a chunk of similar tokens is never written past its target. A fixed step diverged in
training (the recall benchmark went to NaN within 50 steps) once the learned weights grew.

conv_* is a causal depthwise convolution over the last `CONV_WIDTH` tokens, as Titans puts after its q/k/v
projections: it lets a key hold the token before (a fact's key) and its value the token itself, from the first
refinement step on, where a per-token projection of h_0 (the embeddings) could only associate a token with itself.

Read. A token of chunk c reads y_i = M_{W_c}(q_i), q_i = normalize(conv_Q(W_Q n)_i): the memory written from the chunks
before its own only (chunk 0 reads W_0, which depends on no token). Every block mixes it into its residual stream
through its own projection and a learned gate (memory-as-gate, MAG), between self-attention and the FFN:
    x ← x + sigmoid(W_g RMSNorm(x) + b_g) ⊙ W_o y.

Training. The memory adds no loss of its own: ℓ is minimised at test time by the writes, and the outer parameters
(W_K, W_V, W_Q, the θ/η/α projections, W_0, the read projections and gates) are trained by the language-model loss
through the unrolled writes. The gradient is second order: the closed-form inner gradient is made of ordinary
differentiable operations, and autograd differentiates through it. First order (detaching ∇ℓ) would leave W_K and
W_V without any gradient, since they reach the output only through the writes.

Cost. The chunks are a loop (each write needs the weights the previous one left); inside a chunk everything is
batched. Per token: one MLP read and its share of one MLP gradient, O(mem_dim · hidden). The write and the read
run in fp32 (autocast off), so generation token by token reproduces a one-call forward.

Carrying memory between calls: `NeuralMemoryState` keeps, per refinement step, the weights (as offsets from W_0, so
that an empty state is zeros and W_0 keeps its gradient) and the momentum after the last complete chunk, the
states of the trailing incomplete chunk, which the next call's `build` prepends so chunks stay at absolute
positions, and the `CONV_WIDTH - 1` states before those, which the convolutions see (zeros at the start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cognate.model.config import CognateConfig
from cognate.model.memory import check_no_pending

# Tokens each q/k/v convolution sees: the token and the three before it.
CONV_WIDTH = 4
# Initial biases: θ ≈ 0.5, η ≈ 0.12, α ≈ 0.018 (write, keep a little momentum, forget slowly).
INITIAL_STEP_SIZE_BIAS = 0.0
INITIAL_MOMENTUM_BIAS = -2.0
INITIAL_DECAY_BIAS = -4.0


@dataclass
class NeuralMemoryState:
    """Neural memory carried from one call to the next; per refinement step and sequence."""

    offset1: Tensor  # [T, B, mem_dim, hidden]: W1 - W1_0 after the last complete chunk
    offset2: Tensor  # [T, B, hidden, mem_dim]: W2 - W2_0
    momentum1: Tensor  # [T, B, mem_dim, hidden]: S for W1
    momentum2: Tensor  # [T, B, hidden, mem_dim]: S for W2
    next_chunk: int  # absolute index of the next chunk to be written
    pending_states: Tensor  # [T, B, r, d_model]: h_{t-1} of the r < chunk_size tokens of the incomplete chunk
    context_states: Tensor  # [T, B, CONV_WIDTH - 1, d_model]: h_{t-1} of the tokens before the pending ones

    @property
    def n_steps(self) -> int:
        return self.offset1.shape[0]

    @property
    def batch_size(self) -> int:
        return self.offset1.shape[1]

    def detach(self) -> NeuralMemoryState:
        return replace(self, **{name: getattr(self, name).detach() for name in _STATE_TENSORS})

    def select(self, batch_indices: Tensor | list[int]) -> NeuralMemoryState:
        """The memory of some sequences of the batch (e.g. the unfinished ones during generation)."""
        index = torch.as_tensor(batch_indices, dtype=torch.long, device=self.offset1.device)
        return replace(self, **{name: getattr(self, name)[:, index] for name in _STATE_TENSORS})

    def reset(self, sequences: Tensor) -> NeuralMemoryState:
        """The memory with the sequences marked in `sequences` ([B] bool) back to empty (W = W_0, no momentum, no
        context) and the others kept: batch rows that start a new document while the others continue theirs.
        Needs no pending tokens, as `MemoryState.reset` does."""
        check_no_pending(self.pending_states)
        keep = ~sequences.to(device=self.offset1.device, dtype=torch.bool)
        return replace(
            self,
            **{
                name: getattr(self, name) * keep.view(1, -1, 1, 1).to(getattr(self, name).dtype)
                for name in _STATE_TENSORS
                if name != "pending_states"
            },
        )


_STATE_TENSORS = ("offset1", "offset2", "momentum1", "momentum2", "pending_states", "context_states")


@dataclass
class NeuralMemoryBank:
    """What one refinement step reads: each token's memory read, and what the next state and the stats need."""

    read: Tensor  # [B, S, mem_dim] fp32: y_i = M_{W_c}(q_i)
    offset1: Tensor  # [B, mem_dim, hidden]: after this call's last complete chunk
    offset2: Tensor  # [B, hidden, mem_dim]
    momentum1: Tensor
    momentum2: Tensor
    next_chunk: int
    pending_states: Tensor  # [B, r, d_model]
    context_states: Tensor  # [B, CONV_WIDTH - 1, d_model]
    step_size: Tensor  # [B, n_new_tokens] θ of the written tokens (for the stats)
    momentum: Tensor  # [B, n_new] η of the written chunks
    decay: Tensor  # [B, n_new] α of the written chunks
    associative_loss: Tensor  # [B, n_new]: mean ‖M_{W_c}(k_i) − v_i‖² of each chunk before its write
    gate_means: list[Tensor] = field(default_factory=list)  # mean MAG gate of each block that read this bank


class NeuralMemory(nn.Module):
    """The projections, the write controller and the initial weights W_0 of the neural memory; one per model."""

    def __init__(self, cfg: CognateConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.key = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)
        self.value = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)
        self.query = nn.Linear(cfg.d_model, cfg.mem_dim, bias=False)
        # Depthwise taps of the q, k, v convolutions [3 · mem_dim, CONV_WIDTH]; they start as the identity.
        self.conv = nn.Parameter(F.pad(torch.ones(3 * cfg.mem_dim, 1), (CONV_WIDTH - 1, 0)))
        self.step_size = nn.Linear(cfg.d_model, 1)
        self.momentum = nn.Linear(cfg.d_model, 1)
        self.decay = nn.Linear(cfg.d_model, 1)
        # Unit-variance pre-activations for unit keys; outputs of the order of one.
        self.weight1 = nn.Parameter(torch.randn(cfg.mem_dim, cfg.mem_neural_hidden))
        self.weight2 = nn.Parameter(
            torch.randn(cfg.mem_neural_hidden, cfg.mem_dim) / cfg.mem_neural_hidden**0.5
        )
        for linear in (self.key, self.value, self.query, self.step_size, self.momentum, self.decay):
            nn.init.normal_(linear.weight, std=0.02)
        for linear, bias in (
            (self.step_size, INITIAL_STEP_SIZE_BIAS),
            (self.momentum, INITIAL_MOMENTUM_BIAS),
            (self.decay, INITIAL_DECAY_BIAS),
        ):
            nn.init.constant_(linear.bias, bias)

    def empty_state(self, n_steps: int, batch_size: int, device, dtype) -> NeuralMemoryState:
        """A fresh sequence's memory (W = W_0, no momentum), for reading memory from the first token on."""
        c = self.cfg
        shape1 = (n_steps, batch_size, c.mem_dim, c.mem_neural_hidden)
        shape2 = (n_steps, batch_size, c.mem_neural_hidden, c.mem_dim)
        return NeuralMemoryState(
            offset1=torch.zeros(shape1, device=device),
            offset2=torch.zeros(shape2, device=device),
            momentum1=torch.zeros(shape1, device=device),
            momentum2=torch.zeros(shape2, device=device),
            next_chunk=0,
            pending_states=torch.zeros(n_steps, batch_size, 0, c.d_model, device=device, dtype=dtype),
            context_states=torch.zeros(
                n_steps, batch_size, CONV_WIDTH - 1, c.d_model, device=device, dtype=dtype
            ),
        )

    def build(
        self,
        step: int,
        states: Tensor,
        surprise: Tensor | None,
        prior: NeuralMemoryState | None,
        *,
        read: bool = True,
        for_loss: bool = True,
    ) -> NeuralMemoryBank:
        """The memory that refinement step `step` (1-based) reads; states: [B, S, d_model], h_{step-1}.

        `surprise` (the slot memory's write signal) is not used: here the surprise is the associative loss's
        gradient. prior: the memory carried in from the previous call, or None for a fresh sequence. read: False
        when no token of the call reads the bank (all halted): the writes only, the reads are zeros. for_loss: as
        in `LongTermMemory.build`; the neural memory has no auxiliary loss, so nothing depends on it.
        """
        c = self.cfg
        batch, seq_len, _ = states.shape
        if prior is None:
            prior = self.empty_state(step, batch, states.device, states.dtype)
        if not 1 <= step <= prior.n_steps:
            raise ValueError(
                f"memory state holds {prior.n_steps} refinement steps; step {step} was asked for"
            )
        if prior.batch_size != batch:
            raise ValueError(f"memory state holds {prior.batch_size} sequences but the batch has {batch}")
        size = c.mem_chunk_size
        all_states = torch.cat([prior.pending_states[step - 1].to(states.dtype), states], dim=1)
        n_pending = all_states.shape[1] - seq_len
        n_new = all_states.shape[1] // size
        complete = n_new * size
        n_chunks = math.ceil(all_states.shape[1] / size)

        with torch.autocast(states.device.type, enabled=False):
            context = prior.context_states[step - 1].float()
            normed = self.norm(torch.cat([context, all_states.float()], dim=1))
            projected = torch.cat([self.query(normed), self.key(normed), self.value(normed)], dim=-1)
            convolved = (projected.unfold(1, CONV_WIDTH, 1) * self.conv).sum(-1)  # [B, len(all_states), 3m]
            queries, keys, values = convolved.split(c.mem_dim, dim=-1)
            queries = F.normalize(queries, dim=-1)
            keys, values = F.normalize(keys[:, :complete], dim=-1), values[:, :complete]
            normed = normed[:, CONV_WIDTH - 1 :]
            step_size = torch.sigmoid(self.step_size(normed[:, :complete]).squeeze(-1))
            chunk_means = normed[:, :complete].view(batch, n_new, size, normed.shape[-1]).mean(dim=2)
            momentum = torch.sigmoid(self.momentum(chunk_means).squeeze(-1))  # [B, n_new]
            decay = torch.sigmoid(self.decay(chunk_means).squeeze(-1))

            offset1, offset2 = prior.offset1[step - 1].float(), prior.offset2[step - 1].float()
            momentum1, momentum2 = prior.momentum1[step - 1].float(), prior.momentum2[step - 1].float()
            reads, associative_losses = [], []
            for chunk in range(n_chunks):
                weight1, weight2 = self.weight1 + offset1, self.weight2 + offset2
                span = slice(chunk * size, (chunk + 1) * size)
                if read:
                    reads.append(_mlp(queries[:, span], weight1, weight2))
                if chunk == n_new:
                    break  # the incomplete chunk: read, but written only once complete
                grad1, grad2, loss = _normalised_gradient(
                    keys[:, span], values[:, span], step_size[:, span], weight1, weight2
                )
                associative_losses.append(loss)
                eta, alpha = momentum[:, chunk, None, None], decay[:, chunk, None, None]
                momentum1 = eta * momentum1 - grad1
                momentum2 = eta * momentum2 - grad2
                # W_{c+1} = (1 - α) W_c + S_c, kept as the offset from W_0.
                offset1 = (1 - alpha) * offset1 - alpha * self.weight1 + momentum1
                offset2 = (1 - alpha) * offset2 - alpha * self.weight2 + momentum2
        if read:
            memory_read = torch.cat(reads, dim=1)[:, n_pending:]
        else:
            memory_read = states.new_zeros(batch, seq_len, c.mem_dim, dtype=torch.float32)
        return NeuralMemoryBank(
            read=memory_read,
            offset1=offset1,
            offset2=offset2,
            momentum1=momentum1,
            momentum2=momentum2,
            next_chunk=prior.next_chunk + n_new,
            pending_states=all_states[:, complete:],
            context_states=torch.cat([prior.context_states[step - 1].to(states.dtype), all_states], dim=1)[
                :, complete : complete + CONV_WIDTH - 1
            ],
            step_size=step_size,
            momentum=momentum,
            decay=decay,
            associative_loss=(
                torch.stack(associative_losses, dim=1)
                if associative_losses
                else memory_read.new_zeros(batch, 0)
            ),
        )

    def losses(self, banks: list[NeuralMemoryBank], scored: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L_read, L_write) of the slot memory's interface: none here, the LM loss trains the neural memory."""
        zero = torch.zeros((), device=self.weight1.device)
        return zero, zero

    def next_state(self, banks: list[NeuralMemoryBank]) -> NeuralMemoryState:
        """The memory after this call's complete chunks; `banks` holds one bank per refinement step, in order."""
        return NeuralMemoryState(
            offset1=torch.stack([bank.offset1 for bank in banks]),
            offset2=torch.stack([bank.offset2 for bank in banks]),
            momentum1=torch.stack([bank.momentum1 for bank in banks]),
            momentum2=torch.stack([bank.momentum2 for bank in banks]),
            next_chunk=banks[-1].next_chunk,
            pending_states=torch.stack([bank.pending_states for bank in banks]),
            context_states=torch.stack([bank.context_states for bank in banks]),
        )

    def stats(self, banks: list[NeuralMemoryBank]) -> dict[str, Tensor]:
        """Mean MAG read gate; mean θ, η and α of the writes; mean associative loss before each write."""
        gates = [g for bank in banks for g in bank.gate_means]
        zero = torch.zeros((), device=self.weight1.device)

        def mean(name: str) -> Tensor:
            values = torch.cat([getattr(bank, name).detach().flatten() for bank in banks])
            return values.mean() if values.numel() else zero

        return {
            "read_gate": torch.stack(gates).float().mean() if gates else zero,
            "step_size": mean("step_size"),
            "momentum": mean("momentum"),
            "decay": mean("decay"),
            "associative_loss": mean("associative_loss"),
        }


class NeuralMemoryRead(nn.Module):
    """One block's read of the neural memory: its own projection of y, mixed in by a learned gate (MAG)."""

    def __init__(self, cfg: CognateConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.out = nn.Linear(cfg.mem_dim, cfg.d_model, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model)
        # The core's (GPT-2) scheme: N(0, 0.02), the projection into the residual stream scaled down by depth.
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: Tensor, bank: NeuralMemoryBank | None, rows: Tensor | None = None) -> Tensor:
        """The residual update for x [B, S, d_model], or for the tokens `rows` of the flattened [B·S] batch,
        x [n, d_model]; zeros when there is no memory to read."""
        if bank is None:
            return torch.zeros_like(x)
        read = bank.read.flatten(0, 1)
        if rows is not None:
            read = read.index_select(0, rows)
        gate = torch.sigmoid(self.gate(self.norm(x)))
        bank.gate_means.append(gate.detach().mean())
        return gate * self.out(read.view(*x.shape[:-1], -1).to(x.dtype))


def _mlp(inputs: Tensor, weight1: Tensor, weight2: Tensor) -> Tensor:
    """M_W(inputs) for [B, L, mem_dim] inputs and per-sequence weights [B, mem_dim, H], [B, H, mem_dim]."""
    return F.silu(inputs @ weight1) @ weight2


def _normalised_gradient(
    keys: Tensor, values: Tensor, step_size: Tensor, weight1: Tensor, weight2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """∇_W ℓ_c / (2 N_c) for one chunk of every sequence, and its mean ‖M_W(k_i) − v_i‖² (see the module docstring):
    no token, and no chunk of similar tokens as a whole, is written past its target."""
    grad1, grad2, curvature, loss = _associative_gradient(keys, values, step_size, weight1, weight2)
    scale = 0.5 / torch.maximum(curvature.amax(-1), (step_size * curvature).sum(-1))[:, None, None]
    return scale * grad1, scale * grad2, loss


def _associative_gradient(
    keys: Tensor, values: Tensor, step_size: Tensor, weight1: Tensor, weight2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For one chunk of every sequence: ∇_W Σ_i θ_i ‖M_W(k_i) − v_i‖² in closed form, each token's curvature bound
    E_i (detached) and the mean ‖M_W(k_i) − v_i‖².

    With z = k W1, a = silu(z), e = a W2 − v and g = 2 θ e:  ∇W2 = aᵀ g,  ∇W1 = kᵀ ((g W2ᵀ) ⊙ silu'(z)),
    silu'(z) = σ(z) (1 + z (1 − σ(z))). A step −ε ∇ on token i alone moves its output by −2 ε θ_i J_i J_iᵀ e_i, with
    J_i J_iᵀ = ‖a_i‖² I + ‖k_i‖² W2ᵀ diag(silu'(z_i)²) W2 ⪯ E_i I, E_i = ‖a_i‖² + ‖k_i‖² Σ_h silu'(z_ih)² ‖W2_h‖².
    """
    pre = keys @ weight1
    gate = torch.sigmoid(pre)
    hidden = pre * gate
    error = hidden @ weight2 - values
    grad_out = 2.0 * step_size[..., None] * error
    grad2 = hidden.transpose(1, 2) @ grad_out
    slope = gate * (1 + pre * (1 - gate))
    grad1 = keys.transpose(1, 2) @ ((grad_out @ weight2.transpose(1, 2)) * slope)
    with torch.no_grad():
        row_energy = weight2.square().sum(-1)  # [B, H]
        curvature = (
            hidden.square().sum(-1) + keys.square().sum(-1) * (slope.square() @ row_energy[..., None])[..., 0]
        )
    return grad1, grad2, curvature, error.detach().square().sum(-1).mean(-1)
