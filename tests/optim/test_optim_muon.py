"""Newton-Schulz orthogonalisation and the Muon / AdamW update rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.optim import MuGrokfast
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
    # docs/optim.md: "about [0.68, 1.2]"; over 300 random cases the extremes seen were 0.677 and 1.14.
    assert singular.min() > 0.67 and singular.max() < 1.2
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


@pytest.mark.parametrize(
    ("rows", "cols", "expected"), [(32, 8, 2.0), (8, 32, 1.0), (16, 16, 1.0), (50, 2, 5.0), (27, 3, 3.0)]
)
def test_muon_update_scale_is_sqrt_of_rows_over_cols_for_tall_matrices_only(rows, cols, expected):
    assert muon_update_scale(rows, cols) == pytest.approx(expected)


def _newton_schulz_of_a_scalar(x: float, steps: int = 5) -> float:
    """The reference's quintic iterated on one singular value, each product rounded to bf16 as on a matrix:
    g = x², x <- a·x + (b·g + c·g²)·x. Rounding matters: from 1/2, exact arithmetic ends at 0.765, bf16 at 0.824."""

    def bf16(value: float) -> float:
        return torch.tensor(value).bfloat16().item()

    x = bf16(x)
    for _ in range(steps):
        g = bf16(x * x)
        x = bf16(3.4445 * x + bf16(-4.7750 * g + 2.0315 * g * g) * x)
    return x


@pytest.mark.parametrize(("rows", "cols"), [(32, 8), (8, 32), (8, 8), (72, 8)])
def test_muon_moves_an_orthogonal_gradient_by_the_hand_computed_amount(rows, cols):
    # G = 3·Q with Q semi-orthogonal: Frobenius normalisation leaves every singular value at 1/sqrt(k), so the
    # update is s·Q with s the scalar quintic from 1/sqrt(k), and the step is -lr·sqrt(max(1, rows/cols))·s·Q.
    # k = 8, where the quintic is least sensitive to rounding (1.0670 exact, 1.0703 in bf16): the expected moves
    # per unit of Q are 32x8 -> 0.1·2·1.07, 8x32 and 8x8 -> 0.1·1.07, 72x8 -> 0.1·3·1.07.
    # Q is a signed selection of identity columns, exact in bf16, so the only rounding is the iteration's own.
    k = min(rows, cols)
    generator = torch.Generator().manual_seed(rows)
    signs = torch.randint(0, 2, (k,), generator=generator) * 2.0 - 1.0
    q = torch.eye(max(rows, cols))[:, torch.randperm(max(rows, cols), generator=generator)[:k]] * signs
    q = q if rows >= cols else q.T
    p = torch.zeros(rows, cols)
    lr = 0.1
    muon_step([p], [3.0 * q], [torch.zeros(rows, cols)], **_plain(lr))
    expected = lr * max(1.0, rows / cols) ** 0.5 * _newton_schulz_of_a_scalar(k**-0.5)
    moved = -(p * q).sum() / k  # the component along Q, per unit of Q
    assert moved.item() == pytest.approx(expected, rel=0.01)
    torch.testing.assert_close(p, -moved * q, rtol=0, atol=0.02 * expected)


def _plain(lr: float) -> dict:
    return {"lr": lr, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "ns_steps": 5}


@pytest.mark.parametrize(
    ("shape", "adjust_lr_fn", "options"),
    [
        ((48, 12), "original", {}),  # scale 2: exact in bf16
        ((36, 12), "original", {}),  # scale sqrt(3): rounded once more in bf16 here than in torch
        ((12, 48), "original", {}),
        ((16, 16), None, {}),  # torch's default is "original"
        # Moonshot's rule 0.2·sqrt(max(rows, cols)) equals sqrt(max(1, rows/cols)) exactly when cols == 25.
        ((100, 25), "match_rms_adamw", {}),
        ((30, 25), "match_rms_adamw", {}),
        ((24, 12), "original", {"nesterov": False}),  # plain momentum: the buffer itself is orthogonalised
        ((24, 12), "original", {"ns_steps": 2}),
    ],
)
def test_muon_matches_torch_optim_muon_where_the_update_scales_coincide(shape, adjust_lr_fn, options):
    generator = torch.Generator().manual_seed(sum(shape))
    start = torch.randn(shape, generator=generator)
    ours_param, theirs_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    hyper = {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "ns_steps": 5, **options}
    ours = MuGrokfast([{"params": [ours_param], "kind": "muon", **hyper}])
    theirs = torch.optim.Muon([theirs_param], adjust_lr_fn=adjust_lr_fn, **hyper)
    for _ in range(5):
        grad = torch.randn(shape, generator=generator)
        ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    # Five steps move entries by ~0.05-0.08; a wrong scale or momentum rule moves them ~1e-2 apart.
    torch.testing.assert_close(ours_param.detach(), theirs_param.detach(), rtol=0, atol=3e-4)
