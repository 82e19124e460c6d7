"""`cognate bench grokfast`: the modular-multiplication experiment of the Grokfast paper, four runs at once.

Recipe (Lee et al., 2024, and its reference code ironjr/grokfast `main.py`): x*y mod 97 for x in 0..96 and
y in 1..96 (9,312 equations), a random 50/50 train/validation split, inputs [x, op, y, =] and the answer predicted
at the last position, a 2-layer causal transformer of width 128 with 4 heads, Adam (coupled L2 weight decay) with
lr 1e-3 and betas (0.9, 0.98), a linear warm-up over the first 10 updates, batch 512, validation accuracy after
every epoch. "Steps" count optimizer updates; an epoch is ceil(4656 / 512) = 10 of them.

The runs, all from the same initialization, split and batch order:
    baseline     weight decay 0       no filter        (paper: 95% at step 39,890)
    baseline_wd  weight decay 0.005   no filter        (separates the filter's effect from the decay's)
    ema          weight decay 0.005   EMA alpha 0.98, lamb 2   (paper: 910)
    ma           weight decay 0.01    MA window 100, lamb 5    (paper: 790)

Each run keeps its own parameters, `torch.optim.Adam` and `GrokfastFilter`; the forward pass stacks the runs'
weights along a leading dimension so that one batched matmul serves them all. A run leaves the batch once it reaches
95% validation accuracy, which is all this benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cognate.optim.grokfast import GrokfastConfig, GrokfastFilter

PRIME = 97
TARGET_ACCURACY = 0.95
DEFAULT_STEP_CAP = 12_000  # about 20 minutes on 2 idle CPU cores (see docs/optim.md)
FULL_STEP_CAP = 100_000  # enough for the paper's baseline (39,890) with room for an unlucky seed
PAPER = {"steps_to_95": {"baseline": 39_890, "ema": 910, "ma": 790}, "speedup_ema": 43.8, "speedup_ma": 50.5}


@dataclass(frozen=True)
class Recipe:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_updates: int = 10
    batch_size: int = 512
    dim: int = 128
    layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class RunSpec:
    name: str
    weight_decay: float
    grokfast: GrokfastConfig | None


RUNS = (
    RunSpec("baseline", 0.0, None),
    RunSpec("baseline_wd", 0.005, None),
    RunSpec("ema", 0.005, GrokfastConfig(kind="ema", alpha=0.98, lamb=2.0)),
    RunSpec("ma", 0.01, GrokfastConfig(kind="ma", window=100, lamb=5.0)),
)


def modular_multiplication_data(p: int = PRIME) -> torch.Tensor:
    """Every equation x * y = (x*y mod p) for 0 <= x < p, 0 < y < p, as rows [x, op, y, =, answer]."""
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T
    eq, op = torch.full_like(x, p), torch.full_like(x, p + 1)  # the reference's two extra tokens
    return torch.stack([x, op, y, eq, x * y % p], dim=1)


class ReferenceBlock(nn.Module):
    """The reference's block, quirk included: the residual stream continues from ln_1(x), not from x."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (seq, batch, dim), as in the reference
        mask = torch.triu(torch.full((len(x), len(x)), -math.inf, device=x.device), diagonal=1)
        x = self.ln_1(x)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ReferenceDecoder(nn.Module):
    """The reference model module for module, so that a seed gives the reference's initialization."""

    def __init__(self, recipe: Recipe, num_tokens: int = PRIME + 2, seq_len: int = 5) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(num_tokens, recipe.dim)
        self.position_embeddings = nn.Embedding(seq_len, recipe.dim)
        self.layers = nn.ModuleList(ReferenceBlock(recipe.dim, recipe.heads) for _ in range(recipe.layers))
        self.ln_f = nn.LayerNorm(recipe.dim)
        self.head = nn.Linear(recipe.dim, num_tokens, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) -> logits at the last position (batch, num_tokens)."""
        x = tokens.T
        h = (
            self.token_embeddings(x)
            + self.position_embeddings(torch.arange(len(x), device=x.device))[:, None]
        )
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))[-1]


def batched_logits(w: dict[str, torch.Tensor], tokens: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """ReferenceDecoder.forward for R runs at once: weights stacked on a leading run dimension.

    tokens (batch, seq) are shared by the runs; returns last-position logits (runs, batch, num_tokens). The last
    block computes only the last position, the one the loss reads (causal attention makes this exact).
    """
    runs, (batch, seq) = w["token_embeddings.weight"].shape[0], tokens.shape
    dim, heads = recipe.dim, recipe.heads
    causal = torch.triu(torch.full((seq, seq), -math.inf, device=tokens.device), diagonal=1)
    h = w["token_embeddings.weight"][:, tokens] + w["position_embeddings.weight"][:, None, :seq]
    for i in range(recipe.layers):
        p = f"layers.{i}."
        x = _layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = _linear(x, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"])
        q, k, v = qkv.view(runs, batch, seq, 3, heads, dim // heads).unbind(3)
        last = i == recipe.layers - 1
        if last:  # only the final position matters from here on
            x, q = x[:, :, -1:], q[:, :, -1:]
        scores = torch.einsum("rbqhd,rbkhd->rbhqk", q, k) / math.sqrt(dim // heads)
        if not last:
            scores = scores + causal
        a = torch.einsum("rbhqk,rbkhd->rbqhd", scores.softmax(-1), v).reshape(runs, batch, -1, dim)
        x = x + _linear(a, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        m = F.gelu(
            _linear(
                _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"]),
                w[p + "mlp.0.weight"],
                w[p + "mlp.0.bias"],
            )
        )
        h = x + _linear(m, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    h = _layer_norm(h[:, :, -1], w["ln_f.weight"], w["ln_f.bias"])
    return torch.bmm(h, w["head.weight"].transpose(1, 2))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension with per-run affine parameters (runs, dim)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return F.layer_norm(x, x.shape[-1:]) * weight.view(shape) + bias.view(shape)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (runs, ..., in) @ weight (runs, out, in).T + bias (runs, out), one batched matmul for all runs."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.baddbmm(bias[:, None], flat, weight.transpose(1, 2)).reshape(*x.shape[:-1], -1)


class Run:
    """One training run: its own copy of the weights, its own Adam and warm-up schedule, and an optional filter."""

    def __init__(self, spec: RunSpec, init: dict[str, torch.Tensor], recipe: Recipe) -> None:
        self.spec = spec
        self.params = {name: value.clone().requires_grad_() for name, value in init.items()}
        self.optimizer = torch.optim.Adam(
            self.params.values(),
            lr=recipe.lr,
            betas=recipe.betas,
            weight_decay=spec.weight_decay,
            foreach=True,
        )
        warmup = recipe.warmup_updates  # the reference's schedule, whose first update has lr 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: 1 if update > warmup else update / warmup
        )
        self.filter = GrokfastFilter(self.params.values(), spec.grokfast) if spec.grokfast else None
        self.steps_to_target: int | None = None
        self.val_accuracy = 0.0
        self.steps_trained = 0

    def update(self) -> None:
        if self.filter is not None:
            self.filter.apply()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_trained += 1


def _stack(runs: list[Run]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([run.params[name] for run in runs]) for name in runs[0].params}


@torch.no_grad()
def validation_accuracy(runs: list[Run], valid: torch.Tensor, recipe: Recipe) -> list[float]:
    weights = _stack(runs)
    correct = sum(
        (batched_logits(weights, chunk[:, :4], recipe).argmax(-1) == chunk[:, 4]).sum(1)
        for chunk in valid.split(recipe.batch_size)  # batch-sized chunks stay in cache
    )
    return (correct / len(valid)).tolist()


def train_runs(seed: int, step_cap: int, recipe: Recipe = Recipe(), specs=RUNS, progress=None) -> list[Run]:
    """Train every run from one seed's initialization until it reaches the target accuracy or the step cap.

    The global RNG is used in the reference's order (model init, split, one shuffle per epoch), so a run here
    starts from the same weights and sees the same batches as `main.py --seed SEED` there.
    """
    torch.manual_seed(seed)
    init = {name: value.detach() for name, value in ReferenceDecoder(recipe).state_dict().items()}
    data = modular_multiplication_data()
    train_idx, valid_idx = torch.randperm(len(data)).split(len(data) // 2)
    train, valid = data[train_idx], data[valid_idx]
    runs = [Run(spec, init, recipe) for spec in specs]
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    step = 0
    for _ in range(math.ceil(step_cap / steps_per_epoch)):
        active = [run for run in runs if run.steps_to_target is None]
        if not active:
            break
        for batch in train[torch.randperm(len(train))].split(recipe.batch_size):
            logits = batched_logits(_stack(active), batch[:, :4], recipe)
            targets = batch[:, 4].expand(len(active), -1)
            # Summing the runs' mean losses gives each run exactly the gradient of its own loss.
            F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1).sum().backward()
            for run in active:
                run.update()
            step += 1
        accuracy = validation_accuracy(active, valid, recipe)
        for run, acc in zip(active, accuracy):
            run.val_accuracy = acc
            if acc >= TARGET_ACCURACY:
                run.steps_to_target = step
        if progress is not None:
            progress(step, runs)
    return runs


def median_steps(values: list[int | None]) -> int | None:
    """Median over seeds, a run that never reached the target counting as slower than any that did.

    With an even count the upper middle value is taken, so a median is never better than half the seeds.
    """
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    return ordered[len(ordered) // 2]


def speedup(baseline: int | None, filtered: int | None, step_cap: int) -> tuple[float | None, bool]:
    """baseline / filtered steps, and whether that is only a lower bound (the baseline hit the cap)."""
    if filtered is None:
        return None, False
    if baseline is None:
        return round(step_cap / filtered, 2), True
    return round(baseline / filtered, 2), False


def summarize(per_seed: list[dict], step_cap: int) -> dict:
    """The benchmark's JSON: medians over seeds, the speed-ups they give, and every seed's own figures."""
    names = [spec.name for spec in RUNS]
    steps = {name: median_steps([seed["steps_to_95"][name] for seed in per_seed]) for name in names}
    speedup_ema, lower = speedup(steps["baseline"], steps["ema"], step_cap)
    speedup_ma, _ = speedup(steps["baseline"], steps["ma"], step_cap)
    speedup_ema_wd, lower_wd = speedup(steps["baseline_wd"], steps["ema"], step_cap)
    speedup_ma_wd, _ = speedup(steps["baseline_wd"], steps["ma"], step_cap)
    return {
        "steps_to_95": steps,
        "step_cap": step_cap,
        "speedup_ema": speedup_ema,
        "speedup_ma": speedup_ma,
        "speedup_is_lower_bound": lower,
        "speedup_ema_vs_wd": speedup_ema_wd,
        "speedup_ma_vs_wd": speedup_ma_wd,
        "speedup_vs_wd_is_lower_bound": lower_wd,
        "seeds": [seed["seed"] for seed in per_seed],
        "per_seed": per_seed,
        "paper": PAPER,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument(
        "--cap",
        "--steps",
        type=int,
        default=None,
        help=f"optimizer updates per run at most, rounded up to whole epochs (default {DEFAULT_STEP_CAP:,})",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"cap at {FULL_STEP_CAP:,} updates to reproduce the paper's whole table (hours on a CPU)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one batch of four runs per seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe()
    steps_per_epoch = math.ceil(len(modular_multiplication_data()) // 2 / recipe.batch_size)
    cap = args.cap or (FULL_STEP_CAP if args.full else DEFAULT_STEP_CAP)
    if cap <= 0:
        print("--cap must be positive", file=sys.stderr)
        return 2
    step_cap = math.ceil(cap / steps_per_epoch) * steps_per_epoch
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        runs = train_runs(seed, step_cap, recipe, progress=_progress_printer(seed, start))
        per_seed.append(
            {
                "seed": seed,
                "steps_to_95": {run.spec.name: run.steps_to_target for run in runs},
                "last_val_accuracy": {run.spec.name: round(run.val_accuracy, 4) for run in runs},
            }
        )
    result = summarize(per_seed, step_cap)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["threads"] = torch.get_num_threads()
    if not args.json:
        _print_table(result)
    print(json.dumps(result))
    return 0


def _progress_printer(seed: int, start: float):
    def report(step: int, runs: list[Run]) -> None:
        if step % 500 == 0:
            status = "  ".join(
                f"{run.spec.name} {run.val_accuracy:.3f}"
                + (f" (95% at {run.steps_to_target})" if run.steps_to_target else "")
                for run in runs
            )
            print(
                f"seed {seed} step {step:>6} {time.perf_counter() - start:7.0f}s  {status}",
                file=sys.stderr,
                flush=True,
            )

    return report


def _print_table(result: dict) -> None:
    print(
        f"steps to 95% validation accuracy (cap {result['step_cap']:,}; median over seeds {result['seeds']}):"
    )
    paper = result["paper"]["steps_to_95"]
    for name, steps in result["steps_to_95"].items():
        ours = f"{steps:,}" if steps is not None else f"> {result['step_cap']:,}"
        theirs = f"{paper[name]:,}" if name in paper else "-"
        print(f"  {name:<12} ours {ours:>10}   paper {theirs:>8}")
    bound = ">= " if result["speedup_is_lower_bound"] else ""
    for name, paper_speedup in (("ema", 43.8), ("ma", 50.5)):
        ours = result[f"speedup_{name}"]
        shown = f"{bound}{ours}x" if ours is not None else "n/a (did not reach 95%)"
        print(f"  speed-up {name.upper()} {shown}   paper {paper_speedup}x")
