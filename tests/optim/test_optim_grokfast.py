"""Grokfast filters: hand-computed sequences, the reference's arithmetic, warmup, and state round trips."""

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cognate.model.config import ConfigError
from cognate.optim import GrokfastConfig, GrokfastFilter


def filtered(config: GrokfastConfig, grads: list[float]) -> list[float]:
    """Feed scalar gradients through a filter one update at a time; return what the optimizer would see."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    gf = GrokfastFilter([param], config)
    out = []
    for g in grads:
        param.grad = torch.tensor([g], dtype=torch.float64)
        gf.apply()
        out.append(param.grad.item())
    return out


def test_ema_amplifies_the_slow_component_by_hand():
    # ema: 1 -> 0.5*1 + 0.5*2 = 1.5 -> 0.5*1.5 + 0.5*3 = 2.25; g + 2*ema: 3, 5, 7.5.
    # The fast-part bug, g + lamb*(g - ema), would give 1, 3, 4.5.
    assert filtered(GrokfastConfig(kind="ema", alpha=0.5, lamb=2.0), [1.0, 2.0, 3.0]) == pytest.approx(
        [3, 5, 7.5]
    )


def test_ema_warmup_learns_without_amplifying():
    out = filtered(GrokfastConfig(kind="ema", alpha=0.5, lamb=2.0, warmup_steps=2), [1.0, 2.0, 3.0])
    assert out == pytest.approx([1.0, 2.0, 7.5])  # the third update still uses the EMA built during warmup


def test_ma_waits_for_a_full_window_then_adds_the_mean():
    # window 3: updates 1 and 2 untouched; then mean(1,2,3)=2 -> 3+2; mean(2,3,4)=3 -> 4+3; mean(3,4,10) -> 10+17/3
    out = filtered(GrokfastConfig(kind="ma", window=3, lamb=1.0), [1.0, 2.0, 3.0, 4.0, 10.0])
    assert out == pytest.approx([1.0, 2.0, 5.0, 7.0, 10.0 + 17.0 / 3.0])


def test_ma_warmup_delays_beyond_the_window():
    out = filtered(GrokfastConfig(kind="ma", window=2, lamb=1.0, warmup_steps=3), [1.0, 2.0, 3.0, 4.0])
    assert out == pytest.approx([1.0, 2.0, 3.0, 4.0 + 3.5])


def test_ma_running_sum_stays_exact_over_many_wraps():
    grads = [float(i % 7) * 0.1 + 1e-3 * i for i in range(1000)]
    out = filtered(GrokfastConfig(kind="ma", window=5, lamb=2.0), grads)
    expected = grads[-1] + 2.0 * sum(grads[-5:]) / 5
    assert out[-1] == pytest.approx(expected, rel=1e-12)


def test_ma_running_sum_is_recomputed_when_the_window_wraps():
    # float32: a 1e6 gradient passes through a window of 4 among gradients of 1e-3. Subtracting it from a running
    # sum would leave an error of ~0.06; the exact recomputation at each wrap leaves none at the wrapping update.
    param = torch.nn.Parameter(torch.zeros(1))
    gf = GrokfastFilter([param], GrokfastConfig(kind="ma", window=4, lamb=1.0))
    grads = [1e-3, 2e-3, 3e-3, 1e6, 4e-3, 5e-3, 6e-3, 7e-3]  # the last update wraps the window: slot 3 again
    for g in grads:
        param.grad = torch.tensor([g])
        gf.apply()
    expected = torch.tensor([7e-3]) + torch.tensor(grads[-4:]).sum() / 4
    torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=0)


def reference_ema(grads_by_step, alpha, lamb):
    """ironjr/grokfast gradfilter_ema, restated for a list of per-step gradient lists."""
    state, out = None, []
    for grads in grads_by_step:
        if state is None:
            state = [g.clone() for g in grads]
        state = [s * alpha + g * (1 - alpha) for s, g in zip(state, grads)]
        out.append([g + s * lamb for g, s in zip(grads, state)])
    return out


def reference_ma(grads_by_step, window, lamb):
    """ironjr/grokfast gradfilter_ma with warmup=True."""
    queues = None
    out = []
    for grads in grads_by_step:
        queues = queues or [deque(maxlen=window) for _ in grads]
        step_out = []
        for q, g in zip(queues, grads):
            q.append(g)
            step_out.append(g + sum(q) / len(q) * lamb if len(q) == window else g)
        out.append(step_out)
    return out


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["ema", "ma"]),
    alpha=st.floats(0.0, 0.99),
    window=st.integers(1, 6),
    lamb=st.floats(0.0, 5.0),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_filters_match_the_reference_arithmetic(kind, alpha, window, lamb, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), ()]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    grads_by_step = [
        [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]
    gf = GrokfastFilter(params, GrokfastConfig(kind=kind, alpha=alpha, window=window, lamb=lamb))
    ours = []
    for grads in grads_by_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        gf.apply()
        ours.append([p.grad.clone() for p in params])
    expected = (
        reference_ema(grads_by_step, alpha, lamb)
        if kind == "ema"
        else reference_ma(grads_by_step, window, lamb)
    )
    for got_step, want_step in zip(ours, expected):
        for got, want in zip(got_step, want_step):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_composes_with_a_plain_torch_optimizer():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = torch.optim.SGD([param], lr=0.1)
    gf = GrokfastFilter([param], GrokfastConfig(kind="ema", alpha=0.5, lamb=2.0))
    for g in (1.0, 2.0):
        param.grad = torch.tensor([g])
        gf.apply()
        sgd.step()
    assert param.item() == pytest.approx(1.0 - 0.1 * 3.0 - 0.1 * 5.0)


def test_parameters_without_gradients_are_left_alone():
    used, unused = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    gf = GrokfastFilter([used, unused], GrokfastConfig(kind="ema"))
    used.grad = torch.ones(2)
    gf.apply()
    assert unused.grad is None and unused not in gf.state
    unused.grad = torch.ones(2)  # its average starts at its own first gradient
    gf.apply()
    assert torch.equal(gf.state[unused]["ema"], torch.ones(2))


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_state_dict_round_trip_continues_identically(kind, tmp_path):
    config = GrokfastConfig(kind=kind, window=3, lamb=1.5, warmup_steps=1)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=generator) for _ in range(8)]

    def run(params, gf, steps):
        outs = []
        for g in steps:
            params[0].grad = g.clone()
            gf.apply()
            outs.append(params[0].grad.clone())
        return outs

    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    gf = GrokfastFilter(params, config)
    run(params, gf, grads[:4])
    torch.save(gf.state_dict(), tmp_path / "filter.pt")
    straight = run(params, gf, grads[4:])

    fresh = [torch.nn.Parameter(torch.zeros(4, 3))]
    resumed = GrokfastFilter(fresh, config)
    resumed.load_state_dict(torch.load(tmp_path / "filter.pt", weights_only=True))
    for a, b in zip(straight, run(fresh, resumed, grads[4:])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_loading_a_state_copies_it_into_the_parameters_dtype(kind):
    config = GrokfastConfig(kind=kind, window=2, alpha=0.5)
    saved_by = [torch.nn.Parameter(torch.zeros(3))]
    gf = GrokfastFilter(saved_by, config)
    for step in range(3):
        saved_by[0].grad = torch.full((3,), float(step + 1))
        gf.apply()
    saved = gf.state_dict()
    before = {k: v.clone() for k, v in saved["state"][0].items() if torch.is_tensor(v)}
    loaded_by = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    resumed = GrokfastFilter(loaded_by, config)
    resumed.load_state_dict(saved)
    assert all(v.dtype == torch.float64 for v in resumed.state[loaded_by[0]].values() if torch.is_tensor(v))
    loaded_by[0].grad = torch.full((3,), 10.0, dtype=torch.float64)
    resumed.apply()
    for key, value in before.items():  # the resumed filter updates its own copy, not the saved tensors
        assert torch.equal(saved["state"][0][key], value), key


def test_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"kind=.*alpha=.*window="):
        GrokfastConfig(kind="fir", alpha=1.5, window=0)
    with pytest.raises(ConfigError) as error:
        GrokfastConfig(kind="fir", lamb=-1.0, alpha=1.0, window=0, warmup_steps=-1)
    assert str(error.value) == (
        "invalid GrokfastConfig: kind='fir' must be one of ema, ma; lamb=-1.0 must be non-negative; "
        "alpha=1.0 must lie in [0, 1); window=0 must be at least 1; warmup_steps=-1 must be non-negative"
    )
    GrokfastConfig(lamb=0.0, alpha=0.0, window=1, warmup_steps=0)  # every boundary that is allowed
