"""The fused, chunked LM head + cross-entropy against the plain path (full logits, F.cross_entropy)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import random_tokens, small_model

from cognate.model import head
from cognate.model.head import IGNORE_INDEX, fused_linear_cross_entropy


def _problem(rows: int, vocab: int, dim: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator, dtype=dtype) / dim**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[torch.rand(rows, generator=generator) < 0.25] = IGNORE_INDEX
    return hidden, weight, targets


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(2, 50),
    chunk_rows=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_matches_full_logits_cross_entropy_in_fp32(rows, vocab, chunk_rows, seed):
    hidden, weight, targets = _problem(rows, vocab, 8, seed)
    original = head.CHUNK_ELEMENTS
    head.CHUNK_ELEMENTS = chunk_rows * vocab  # chunk boundaries anywhere, including mid-batch
    try:
        fused = fused_linear_cross_entropy(hidden, weight, targets)
        fused.loss_sum.backward()
    finally:
        head.CHUNK_ELEMENTS = original
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T
    plain = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    plain.backward()
    torch.testing.assert_close(fused.loss_sum, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grads[0], hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_grads[1], weight.grad, rtol=1e-4, atol=1e-5)
    valid = targets != IGNORE_INDEX
    row_ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none").detach()
    torch.testing.assert_close(fused.target_ce, torch.where(valid, row_ce, 0.0), rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_stays_close_to_the_plain_path():
    hidden, weight, targets = _problem(64, 300, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, targets)
    fused.loss_sum.backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
    plain = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    plain.backward()
    assert fused.loss_sum.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(fused.loss_sum, plain, rtol=1e-3, atol=1e-3)
    for got, want in zip(fused_grads, (hidden.grad, weight.grad), strict=True):
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
        torch.testing.assert_close(got, want, rtol=0.05, atol=2e-3)


def test_without_gradients_nothing_is_kept_for_backward():
    hidden, weight, targets = _problem(10, 20, 8, seed=0)
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, targets)
    assert out.loss_sum.grad_fn is None


@pytest.mark.parametrize("memory_on", [False, True])
def test_training_loss_and_gradients_match_the_plain_head(memory_on):
    """The model's L_ref (fused) equals F.cross_entropy on the logits the model returns without targets, averaged
    over the supervised steps (1..t_infer and the last grad_steps; step 2 here runs under no_grad).

    With memory on this also checks that both paths hand the memory the same surprise: otherwise the banks, and
    so the logits, would differ.
    """
    model = small_model(t_train=3, t_infer=1, grad_steps=1, mem_enabled=memory_on, dropout=0.0).train()
    tokens = random_tokens(2, 21)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = IGNORE_INDEX

    fused = model(tokens, targets=targets).losses["ref"]
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    plain = (
        sum(
            F.cross_entropy(
                model(tokens, n_steps=n).logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
            )
            for n in (1, 3)
        )
        / 2
    )
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    plain_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("act_enabled", "memory_on"), [(False, False), (True, False), (True, True)])
def test_evaluation_loss_is_the_cross_entropy_of_the_returned_logits(act_enabled, memory_on):
    """In evaluation (per-token halting) the fused L_ref equals F.cross_entropy on the logits returned without
    targets: each token scored at its own halting step, whichever parts score the steps."""
    model = small_model(act_enabled=act_enabled, mem_enabled=memory_on).eval()
    tokens = random_tokens(2, 21)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = IGNORE_INDEX
    with torch.no_grad():
        fused = model(tokens, targets=targets)
        logits = model(tokens).logits
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert fused.logits is None
    torch.testing.assert_close(fused.losses["ref"], plain, rtol=1e-5, atol=1e-6)
