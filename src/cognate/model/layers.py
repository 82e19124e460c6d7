"""The transformer core's layers: RMSNorm, rotary positions, causal (sliding-window) attention, SwiGLU, Block.

Everything here is position-parallel: no loop over tokens. Attention goes through `scaled_dot_product_attention`;
with a sliding window it is computed block-locally so its cost is O(S·W) rather than O(S²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cognate.model.config import CognateConfig
from cognate.model.kernels import compiled_where_available
from cognate.model.memory import MemoryBank, MemoryRead
from cognate.model.neural_memory import NeuralMemoryRead


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, computed in fp32 so it is stable under bf16 autocast."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


# --- rotary positions -------------------------------------------------------------------------------------------


@dataclass
class Rotary:
    """cos/sin tables for a run of absolute positions, shared by every layer and refinement step of a call."""

    cos: Tensor  # [S, head_dim / 2], fp32
    sin: Tensor

    @classmethod
    def for_positions(cls, positions: Tensor, head_dim: int, theta: float) -> Rotary:
        inv_freq = theta ** (
            -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
        )
        angles = positions.float()[:, None] * inv_freq[None, :]
        return cls(angles.cos(), angles.sin())

    def apply(self, x: Tensor) -> Tensor:
        """Rotate [B, H, S, head_dim] in the half-split (GPT-NeoX / Llama) layout."""
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)
        return rotated.type_as(x)


# --- attention --------------------------------------------------------------------------------------------------


# CPU attention in bf16 materialises the probabilities (see MaterializedAttention) when a query sees at most this
# many keys: full causal attention up to this length, and every sliding window up to it.
MATERIALIZED_ATTENTION_MAX_KEYS = 1280


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None, dropout_p: float = 0.0) -> Tensor:
    """Causal attention over [B, H, S, hd]; query i sees keys j with i - window < j <= i (all j <= i if None)."""
    if window is None or q.size(-2) <= window:
        seq = q.size(-2)
        if _materialize(q, seq, dropout_p):
            causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
            return MaterializedAttention.apply(q, k, v, causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return _sliding_window_attention(q, k, v, window, dropout_p)


def _materialize(q: Tensor, n_keys: int, dropout_p: float) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and dropout_p == 0.0
        and n_keys <= MATERIALIZED_ATTENTION_MAX_KEYS
    )


def _sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, dropout_p: float) -> Tensor:
    """Blocked local attention: each block of `block` queries attends to the `window + block` keys ending at it.

    Every query's window lies inside its block's key span, so one small [block, window + block] mask (plus, for the
    first blocks, the rule that there are no keys before position 0) gives exact sliding-window attention at
    O(S·window) time and memory. Blocks of window/4 queries waste little work on masked keys (1.25·window keys per
    query instead of 2·window with blocks of `window`) while keeping each attention call large.
    """
    batch, heads, seq, head_dim = q.shape
    block = max(1, window // 4)
    span = window + block
    n_blocks = math.ceil(seq / block)
    pad = n_blocks * block - seq
    # Padding goes after the last query (causality hides it from real queries) and `window` zero keys go before
    # the first, so block j's keys are padded positions [j·block, j·block + span), i.e. real j·block - window on.
    q = F.pad(q, (0, 0, 0, pad)).reshape(batch * heads, n_blocks, block, head_dim)
    k, v = (
        F.pad(t, (0, 0, window, pad))
        .reshape(batch * heads, -1, head_dim)
        .unfold(1, span, block)
        .transpose(-1, -2)
        for t in (k, v)
    )  # [B·H, n_blocks, span, hd]
    query = torch.arange(block, device=q.device)[:, None]  # position j·block + query
    key = torch.arange(span, device=q.device)[None, :]  # position j·block - window + key
    block_start = torch.arange(n_blocks, device=q.device)[:, None, None] * block
    mask = (key > query) & (key <= query + window) & (key >= window - block_start)
    if _materialize(q, span, dropout_p):
        out = MaterializedAttention.apply(q, k, v, mask)
    else:
        # A 4-D mask [1, n_blocks, block, span] keeps SDPA on its fused kernels (a 3-D one falls back to math).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], dropout_p=dropout_p)
    return out.reshape(batch, heads, n_blocks * block, head_dim)[:, :, :seq]


class MaterializedAttention(torch.autograd.Function):
    """Masked attention as two bf16 batched matmuls around one fused softmax kernel, for short key spans on CPU.

    PyTorch's CPU flash-attention kernel runs at ~20-70 GFLOP/s with this model's small heads (head_dim 32-54),
    where a bf16 batched matmul runs at ~300 per core: measured forward + backward at [8, 4, 512, 32] in bf16 on one
    core, 84 ms flash vs 29 ms here. While a query sees at most MATERIALIZED_ATTENTION_MAX_KEYS keys, the
    probabilities (kept in bf16 for backward, as autocast would keep them) stay small; beyond that the flash
    kernel's O(S) memory wins. `allowed` is a boolean mask broadcastable to the scores [..., queries, keys]; every
    query must be allowed at least one key (its own position, in causal attention).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        scale = q.size(-1) ** -0.5
        probs = _masked_softmax(q @ k.transpose(-1, -2), allowed, scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return probs @ v

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad_scores = _masked_softmax_backward(probs, grad_out @ v.transpose(-1, -2), ctx.scale)
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, probs.transpose(-1, -2) @ grad_out, None


def _masked_softmax_eager(scores: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """softmax(scale · scores) over the allowed keys, in fp32, returned in the scores' dtype."""
    masked = (scores.float() * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(masked, dim=-1).to(scores.dtype)


def _masked_softmax_backward_eager(probs: Tensor, grad_probs: Tensor, scale: float) -> Tensor:
    """d(loss)/d(scores) from the softmax's output and the gradient at it (masked entries have probs 0)."""
    p, dp = probs.float(), grad_probs.float()
    return (p * (dp - (p * dp).sum(-1, keepdim=True)) * scale).to(probs.dtype)


_masked_softmax = compiled_where_available(_masked_softmax_eager)
_masked_softmax_backward = compiled_where_available(_masked_softmax_backward_eager)


@dataclass
class KVCache:
    """Keys and values of one (refinement step, layer) during generation, trimmed to what the window can see."""

    keys: Tensor  # [B, H, L, hd]
    values: Tensor

    def attend(self, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        """Attention of the new tokens' queries over cached + new keys; then remember the new keys."""
        cached = self.keys.size(-2)
        new = q.size(-2)
        if cached == 0:
            out = causal_attention(q, k, v, window)
        else:
            keys, values = torch.cat((self.keys, k), dim=-2), torch.cat((self.values, v), dim=-2)
            mask = None
            if new > 1:  # several new tokens: causal among themselves, windowed over the cache
                query = torch.arange(cached, cached + new, device=q.device)[:, None]
                key = torch.arange(cached + new, device=q.device)[None, :]
                mask = key <= query
                if window is not None:
                    mask &= key > query - window
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            k, v = keys, values
        self._keep(k, v, window)
        return out

    def append(self, k: Tensor, v: Tensor, window: int | None) -> None:
        """Remember new keys and values without attending (a halted token's, which later tokens still read)."""
        self._keep(torch.cat((self.keys, k), dim=-2), torch.cat((self.values, v), dim=-2), window)

    def _keep(self, k: Tensor, v: Tensor, window: int | None) -> None:
        if window is not None:  # the next query sees only the window - 1 tokens before it
            first = max(0, k.size(-2) - (window - 1))
            k, v = k[:, :, first:], v[:, :, first:]
        self.keys, self.values = k, v

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, device, dtype) -> KVCache:
        blank = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        return cls(blank, blank)


class SelfAttention(nn.Module):
    def __init__(self, cfg: CognateConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.attn_window
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, rotary: Rotary, cache: KVCache | None = None, rows: Tensor | None = None
    ) -> Tensor:
        """x: [B, S, D] -> [B, S, D]; with `rows` (indices into the flattened B·S tokens), only those tokens'
        outputs [n, D], while every token's keys and values are attended to."""
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotary.apply(q), rotary.apply(k)
        if cache is None:
            y = causal_attention(q, k, v, self.window, self.dropout if self.training else 0.0)
        else:
            y = cache.attend(q, k, v, self.window)
        y = y.transpose(1, 2).reshape(batch, seq, d_model)
        if rows is not None:
            y = y.flatten(0, 1).index_select(0, rows)
        return self.out(y)

    def lend_keys_values(self, x: Tensor, rotary: Rotary, cache: KVCache) -> None:
        """Only the keys and values of x [B, S, D], into the cache: two of the three input projections."""
        batch, seq, d_model = x.shape
        kv = F.linear(x, self.qkv.weight[d_model:]).view(batch, seq, 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        cache.append(rotary.apply(k), v, self.window)


class SwiGLU(nn.Module):
    def __init__(self, cfg: CognateConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm block: self-attention, then the memory read (MAG-gated, zero without a bank), then the FFN.

    With `rows` (evaluation with per-token halting) only those tokens of the flattened [B·S] batch are refined. The
    others have halted: their residual stream stays their frozen step input, and they only lend attention their
    keys and values, projected from it (CALM's state propagation); their attention output, memory read and FFN are
    never computed, and when no token is left the block runs nothing but those projections, into the cache.
    """

    def __init__(self, cfg: CognateConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.memory_read = MemoryRead(cfg) if cfg.mem_kind == "slots" else NeuralMemoryRead(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self._init_weights(cfg)

    def forward(
        self,
        x: Tensor,
        rotary: Rotary,
        bank: MemoryBank | None = None,
        cache: KVCache | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        if rows is None:
            x = x + self.dropout(self.attn(self.attn_norm(x), rotary, cache))
            x = x + self.memory_read(x, bank)
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        if not rows.numel():
            if cache is not None:
                self.attn.lend_keys_values(self.attn_norm(x), rotary, cache)
            return x
        flat = x.flatten(0, 1)
        y = flat.index_select(0, rows) + self.attn(self.attn_norm(x), rotary, cache, rows)
        y = y + self.memory_read(y, bank, rows)
        y = y + self.ffn(self.ffn_norm(y))
        return flat.index_copy(0, rows, y.to(flat.dtype)).view_as(x)

    def _init_weights(self, cfg: CognateConfig) -> None:
        # GPT-2's scheme: N(0, 0.02), with the projections that write into the residual stream scaled down by
        # the depth they are summed over, so the stream's variance does not grow with n_layers.
        for linear in (self.attn.qkv, self.ffn.gate, self.ffn.up):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in (self.attn.out, self.ffn.down):
            nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
