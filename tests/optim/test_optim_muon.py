"""Newton-Schulz orthogonalisation and the Muon / AdamW update rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.optim.muon import adamw_step, muon_step, muon_update_scale, newton_schulz


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 96), cols=st.integers(2, 96), seed=st.integers(0, 2**16))
def test_newton_schulz_output_is_close_to_orthogonal(rows, cols, seed):
    # A well-conditioned G (singular values in [0.2, 1]): every singular value of the output lands near 1.
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    s = 0.2 + 0.8 * torch.rand(k, generator=generator)
    out = newton_schulz(3.0 * u @ torch.diag(s) @ v.T)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, cols)
    singular = torch.linalg.svdvals(out.float())
    assert singular.min() > 0.6 and singular.max() < 1.25
    # ... and it keeps G's singular vectors: u^T out v is close to diagonal.
    core = u.T @ out.float() @ v
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 0.1


def test_newton_schulz_is_batched_and_transpose_consistent():
    g = torch.randn(3, 40, 24)
    batched = newton_schulz(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(g[i]))
        torch.testing.assert_close(newton_schulz(g[i].T), newton_schulz(g[i]).T)


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        newton_schulz(torch.randn(5))


def test_muon_step_is_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    params = [torch.randn(32, 8), torch.randn(8, 32), torch.randn(32, 8)]
    start = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    muon_step(params, grads, buffers, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, ns_steps=5)
    for p, p0, g, buf in zip(params, start, grads, buffers):
        torch.testing.assert_close(buf, 0.1 * g)  # momentum buffer: lerp toward g by 1 - momentum
        nesterov = g + 0.9 * (0.1 * g - g)
        expected = p0 - 0.1 * newton_schulz(nesterov).float() * muon_update_scale(*p.shape)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_muon_step_ignores_gradient_scale_and_applies_decoupled_decay():
    torch.manual_seed(0)
    g = torch.randn(16, 16)
    moved = []
    for scale in (1e-4, 1e4):
        p = torch.ones(16, 16)
        muon_step(
            [p],
            [g * scale],
            [torch.zeros(16, 16)],
            lr=0.01,
            momentum=0.0,
            nesterov=False,
            weight_decay=0.0,
            ns_steps=5,
        )
        moved.append(p - 1.0)
    # Same update up to bf16 rounding, although the gradients differ by 10^8 (SGD would move 10^8 times more).
    assert torch.nn.functional.cosine_similarity(moved[0].flatten(), moved[1].flatten(), dim=0) > 0.99
    assert moved[0].norm() == pytest.approx(moved[1].norm().item(), rel=0.02)
    p = torch.ones(4, 4)
    muon_step(
        [p],
        [torch.zeros(4, 4)],
        [torch.zeros(4, 4)],
        lr=0.5,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.2,
        ns_steps=5,
    )
    torch.testing.assert_close(p, torch.full((4, 4), 0.9))


def test_adamw_step_matches_torch_adamw_step_for_step():
    torch.manual_seed(0)
    shapes = [(7, 3), (5,), ()]
    ours = [torch.randn(s) for s in shapes]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    reference = torch.optim.AdamW(
        theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True
    )
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    for step in range(1, 6):
        grads = [torch.randn(s) * 10**step for s in shapes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        reference.step()
        adamw_step(
            ours,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [step] * 3,
            lr=1e-2,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.1,
        )
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
