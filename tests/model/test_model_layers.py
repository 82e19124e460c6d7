"""Attention (full, sliding-window, cached) and rotary positions against direct reference computations."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from cognate.model.layers import KVCache, Rotary, causal_attention


def _reference(q, k, v, window):
    """Sliding-window causal attention through one explicit S×S mask: query i sees i - window < j <= i."""
    i = torch.arange(q.size(-2))
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(batch, heads, length, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 70),
    window=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
def test_blocked_sliding_window_attention_equals_the_masked_reference(length, window, seed):
    q, k, v = _qkv(2, 3, length, 8, seed)
    torch.testing.assert_close(
        causal_attention(q, k, v, window), _reference(q, k, v, window), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    pieces=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    window=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
)
def test_attention_over_a_kv_cache_equals_attention_over_the_whole_sequence(pieces, window, seed):
    """Feeding a sequence piece by piece through the cache (trimmed to the window) changes nothing."""
    q, k, v = _qkv(1, 2, sum(pieces), 8, seed)
    cache = KVCache.empty(1, 2, 8, "cpu", torch.float32)
    outputs, start = [], 0
    for n in pieces:
        piece = slice(start, start + n)
        outputs.append(cache.attend(q[:, :, piece], k[:, :, piece], v[:, :, piece], window))
        start += n
        if window is not None:
            assert cache.keys.size(-2) <= window - 1  # bounded by what the next query can see
    torch.testing.assert_close(torch.cat(outputs, dim=2), _reference(q, k, v, window), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(shift=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rotary_scores_depend_only_on_relative_position(shift, seed):
    q, k, _ = _qkv(1, 1, 6, 16, seed)
    positions = torch.tensor([0, 3, 4, 10, 11, 40])
    scores = [
        (rotary.apply(q) @ rotary.apply(k).transpose(-1, -2))
        for rotary in (Rotary.for_positions(p, 16, 10_000.0) for p in (positions, positions + shift))
    ]
    # fp32 angles at positions in the thousands carry ~1e-4 rad of rounding; a wrong rotation is off by O(1).
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-3, atol=2e-3)


@settings(max_examples=20, deadline=None)
@given(
    length=st.integers(1, 80),
    window=st.one_of(st.none(), st.integers(1, 30)),
    head_dim=st.sampled_from([8, 27, 32]),
    seed=st.integers(0, 2**16),
)
def test_bf16_cpu_attention_path_matches_the_fp32_reference_and_its_gradients(length, window, head_dim, seed):
    """bf16 on CPU takes the materialised path (bf16 matmuls around a fused softmax), causal or blocked
    sliding-window: same values and gradients as the fp32 reference, to bf16 precision."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, length, head_dim, seed))
    grad_out = torch.randn(2, 3, length, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    reference = _reference(q, k, v, window)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*low, window=window)
    grads = torch.autograd.grad(out, low, grad_out.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.03)
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item() + 0.03)


class LargestIntermediates(TorchDispatchMode):
    """Records every tensor an operator produces that has two dimensions of at least `length`."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length, self.square = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and sum(size >= self.length for size in tensor.shape) >= 2:
                self.square.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_attention_never_allocates_a_sequence_by_sequence_tensor(dtype):
    # docs/architecture.md: with a window, attention is O(S·W) in memory, never an S×S mask. Forward and backward at S = 1024, window 16:
    # no operator may produce an [S, S]-sized tensor (scores, probabilities or mask). Full causal attention in
    # bf16 on the CPU materialises its probabilities, which shows that the check sees them.
    length = 1024
    q, k, v = (torch.randn(1, 2, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    with LargestIntermediates(length) as seen:
        causal_attention(q, k, v, window=16).sum().backward()
    assert seen.square == []
    if dtype == torch.bfloat16:
        with LargestIntermediates(length) as seen:
            causal_attention(q, k, v, window=None).sum().backward()
        assert seen.square
