"""MuGrokfast as a whole: groups, learning rates that reach the step, filter composition, exact resume."""

import pytest
import torch
from torch import nn

from cognate.model.config import ConfigError
from cognate.optim import (
    PRESETS,
    GrokfastConfig,
    MuGrokfast,
    MuGrokfastConfig,
    make_optimizer,
    param_groups,
    preset,
)
from cognate.optim.muon import muon_update_scale, newton_schulz


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 20, bias=False)

    def forward(self, tokens):
        return self.lm_head(self.norm(torch.relu(self.hidden(self.embed(tokens)))))


def loss_of(model, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (4, 6), generator=generator)
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def train(model, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, seed).backward()
        optimizer.step()


def model_and_copy():
    torch.manual_seed(0)
    model = Tiny()
    twin = Tiny()
    twin.load_state_dict(model.state_dict())
    return model, twin


CONFIG = MuGrokfastConfig(
    adamw_lr=1e-2, muon_lr=2e-2, grokfast=GrokfastConfig(kind="ema", lamb=2.0, alpha=0.9)
)


def test_groups_carry_their_hyperparameters():
    groups = {g["name"]: g for g in param_groups(Tiny(), "mugrokfast", CONFIG)}
    assert [len(groups[name]["params"]) for name in ("muon", "adamw", "adamw_no_decay")] == [1, 2, 3]
    assert groups["muon"]["kind"] == "muon" and groups["muon"]["lr"] == 2e-2
    assert groups["adamw"]["weight_decay"] == 0.1 and groups["adamw"]["betas"] == (0.9, 0.95)
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0 and groups["adamw_no_decay"]["lr"] == 1e-2


def test_non_matrix_parameters_follow_torch_adamw_not_sgd():
    # The seeds trained 1-D parameters with plain SGD under AdamW's name. Here the AdamW groups must agree with
    # torch.optim.AdamW step for step, even with gradients scaled by 1,000 (which SGD would turn into huge steps).
    model, twin = model_and_copy()
    for m in (model, twin):  # keep the Muon matrix fixed so that both models see the same gradients
        m.hidden.requires_grad_(False)
    ours = MuGrokfast(param_groups(model, "muon", CONFIG))
    adamw_groups = param_groups(twin, "muon", CONFIG)
    assert {g["kind"] for g in adamw_groups} == {"adamw"}
    reference = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "kind"} for g in adamw_groups], foreach=True
    )
    for seed in range(4):
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            (1000 * loss_of(m, seed)).backward()
        ours.step()
        reference.step()
        for name in ("embed.weight", "norm.weight", "norm.bias", "lm_head.weight"):
            torch.testing.assert_close(
                model.get_parameter(name), twin.get_parameter(name), rtol=1e-6, atol=1e-7
            )


def test_first_muon_step_is_the_orthogonalised_gradient():
    model, _ = model_and_copy()
    optimizer = MuGrokfast(param_groups(model, "muon", CONFIG))
    before = model.hidden.weight.detach().clone()
    loss_of(model, 0).backward()
    grad = model.hidden.weight.grad.clone()
    optimizer.step()
    nesterov = grad * (1 - 0.95**2)  # momentum buffer (1 - beta) g, then g lerped toward it by beta
    expected = before - 2e-2 * newton_schulz(nesterov).float() * muon_update_scale(8, 8)
    torch.testing.assert_close(model.hidden.weight.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["muon", "mugrokfast", "adamw"])
def test_changing_a_group_lr_changes_the_step(kind):
    deltas = []
    for factor in (0.0, 1.0, 2.0):
        model, _ = model_and_copy()
        optimizer = make_optimizer(model, kind, CONFIG)
        for group in optimizer.param_groups:
            group["lr"] *= factor
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, optimizer, [0])
        deltas.append({n: (p.detach() - before[n]) for n, p in model.named_parameters()})
    for name, zero in deltas[0].items():
        assert torch.count_nonzero(zero) == 0, name
        torch.testing.assert_close(deltas[2][name], 2 * deltas[1][name], rtol=1e-4, atol=1e-7)


def test_filter_feeds_the_base_step_the_amplified_slow_gradient():
    # MuGrokfast == (EMA filter by hand) + Muon/AdamW without a filter, on every parameter.
    model, twin = model_and_copy()
    with_filter = MuGrokfast(param_groups(model, "mugrokfast", CONFIG), CONFIG.grokfast)
    without = MuGrokfast(param_groups(twin, "muon", CONFIG))
    emas = {}
    for seed in range(3):
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            loss_of(m, seed).backward()
        for name, p in twin.named_parameters():
            ema = emas.get(name, p.grad.clone())
            emas[name] = 0.9 * ema + 0.1 * p.grad
            p.grad = p.grad + 2.0 * emas[name]
        with_filter.step()
        without.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("filter_kind", ["ema", "ma", None])
def test_save_and_load_mid_run_continues_bit_identically(filter_kind, tmp_path):
    grokfast = GrokfastConfig(kind=filter_kind, window=3, warmup_steps=2) if filter_kind else None
    config = CONFIG.replace(grokfast=grokfast or GrokfastConfig())
    kind = "mugrokfast" if filter_kind else "muon"

    model, _ = model_and_copy()
    optimizer = make_optimizer(model, kind, config)
    train(model, optimizer, range(4))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    train(model, optimizer, range(4, 9))

    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    resumed = Tiny()
    resumed_optimizer = make_optimizer(resumed, kind, config)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, range(4, 9))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_loading_state_with_a_different_filter_setting_is_refused():
    model, twin = model_and_copy()
    filtered = make_optimizer(model, "mugrokfast", CONFIG)
    train(model, filtered, [0])
    plain = make_optimizer(twin, "muon", CONFIG)
    with pytest.raises(ValueError, match="Grokfast"):
        plain.load_state_dict(filtered.state_dict())


def test_bad_groups_are_refused_with_the_reason():
    model = Tiny()
    with pytest.raises(ValueError, match="kind"):
        MuGrokfast([{"params": list(model.parameters()), "lr": 1.0}])
    with pytest.raises(ValueError, match="missing momentum"):
        MuGrokfast(
            [
                {
                    "params": [model.hidden.weight],
                    "kind": "muon",
                    "lr": 1.0,
                    "nesterov": True,
                    "weight_decay": 0.0,
                    "ns_steps": 5,
                }
            ]
        )
    with pytest.raises(ValueError, match="matrices only"):
        MuGrokfast(
            [
                {
                    "params": [model.norm.weight],
                    "kind": "muon",
                    "lr": 1.0,
                    "momentum": 0.9,
                    "nesterov": True,
                    "weight_decay": 0.0,
                    "ns_steps": 5,
                }
            ]
        )


def test_each_optimizer_reduces_the_loss():
    for kind in ("adamw", "muon", "mugrokfast"):
        model, _ = model_and_copy()
        optimizer = make_optimizer(model, kind, CONFIG)
        start = loss_of(model, 0).item()
        train(model, optimizer, [0] * 30)
        assert loss_of(model, 0).item() < 0.8 * start, kind


def test_presets_hold_the_seed_settings():
    guide, reduced = preset("pretraining-guide"), preset("phase1-reduced")
    assert (guide.adamw_lr, guide.grokfast.lamb, guide.grokfast.alpha, guide.grokfast.warmup_steps) == (
        2e-4,
        2.0,
        0.98,
        2000,
    )
    assert (reduced.adamw_lr, reduced.muon_lr, reduced.grokfast.lamb) == (5e-4, 5e-3, 0.02)
    assert all(p.betas == (0.9, 0.95) and p.weight_decay == 0.1 for p in PRESETS.values())
    with pytest.raises(ConfigError, match="unknown optimizer preset"):
        preset("nuclear-fix")


def test_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"adamw_lr=.*betas=.*ns_steps="):
        MuGrokfastConfig(adamw_lr=-1.0, betas=(0.9, 1.5), ns_steps=0)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_optimizer(Tiny(), "sgd", CONFIG)
