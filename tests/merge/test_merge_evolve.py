"""The CMA-ES recipe search on a toy problem: fitness is the distance to a known per-layer mix of the models."""

import math

import pytest
import torch

from cognate.merge import MergeError, Recipe, apply_recipe, evolve, save_history

TARGET = Recipe(
    method="linear",
    models=("a", "b", "c"),
    weights=(0.5, 0.3, 0.2),
    layer_weights={0: (0.0, 1.0, 0.0), 1: (0.1, 0.1, 0.8)},
)


def toy_models():
    g = torch.Generator().manual_seed(0)
    return {
        name: {
            "tok_embeddings.weight": torch.randn(6, 4, generator=g),
            "blocks.0.w": torch.randn(4, 4, generator=g),
            "blocks.1.w": torch.randn(4, 4, generator=g),
        }
        for name in "abc"
    }


class DistanceToTarget:
    """Squared distance to the target mix, counting its calls."""

    def __init__(self, models):
        self.target = apply_recipe(TARGET, models)
        self.calls = 0

    def __call__(self, state_dict):
        self.calls += 1
        return sum(float(((state_dict[k] - self.target[k]) ** 2).sum()) for k in self.target)


def test_evolve_beats_every_reference_and_stays_within_budget(tmp_path):
    models = toy_models()
    fitness = DistanceToTarget(models)
    best, history = evolve(models, fitness, budget=120, seed=0, progress=False)
    assert fitness.calls == len(history) <= 120
    references = [c for c in history if c.kind == "reference"]
    assert [c.recipe.models for c in references] == [("a", "b", "c"), ("a",), ("b",), ("c",)]
    best_reference = min(c.fitness for c in references)
    best_fitness = fitness(apply_recipe(best, models))
    assert best_fitness == min(c.fitness for c in history)
    assert best_fitness < 0.1 * best_reference
    assert best.layer_weights.keys() == {0, 1}
    save_history(history, tmp_path / "history.json")
    assert (tmp_path / "history.json").read_text().count('"fitness"') == len(history)


def test_evolve_is_deterministic_for_a_seed():
    models = toy_models()
    runs = [evolve(models, DistanceToTarget(models), budget=30, seed=7, progress=False) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert [c.fitness for c in runs[0][1]] == [c.fitness for c in runs[1][1]]
    other = evolve(models, DistanceToTarget(models), budget=30, seed=8, progress=False)
    assert [c.fitness for c in other[1]] != [c.fitness for c in runs[0][1]]


def test_evolve_returns_a_single_model_when_it_is_the_best():
    models = toy_models()
    target = models["b"]

    def distance_to_b(state_dict):
        return sum(float(((state_dict[k] - target[k]) ** 2).sum()) for k in target)

    best, _ = evolve(models, distance_to_b, budget=12, seed=0, progress=False)
    assert best == Recipe(method="linear", models=("b",), weights=(1.0,))
    assert all(torch.equal(apply_recipe(best, models)[k], target[k]) for k in target)


def test_evolve_ties_searches_density_within_bounds():
    models = {**toy_models(), "base": {k: torch.zeros_like(v) for k, v in toy_models()["a"].items()}}
    fitness = DistanceToTarget({k: v for k, v in models.items() if k != "base"})
    _, history = evolve(models, fitness, budget=25, seed=0, method="ties", base="base", progress=False)
    searched = [c for c in history if c.kind == "search"]
    assert searched and all(c.recipe.method == "ties" and c.recipe.base == "base" for c in searched)
    densities = {c.recipe.params["density"] for c in searched}
    assert len(densities) > 1 and all(0.05 <= d <= 1.0 for d in densities)


def test_non_finite_fitness_is_recorded_and_never_chosen():
    models = toy_models()
    fitness = DistanceToTarget(models)

    def flaky(state_dict):
        value = fitness(state_dict)
        return math.nan if fitness.calls % 3 == 0 else value

    best, history = evolve(models, flaky, budget=20, seed=0, progress=False)
    failed = [c for c in history if c.error]
    assert failed and all(c.fitness == math.inf and "nan" in c.error for c in failed)
    assert best == min((c for c in history if math.isfinite(c.fitness)), key=lambda c: c.fitness).recipe


def test_evolve_settings_are_validated():
    models = toy_models()
    with pytest.raises(ValueError, match="budget=2 is below the 4 reference candidates"):
        evolve(models, lambda sd: 0.0, budget=2, progress=False)
    with pytest.raises(ValueError, match="needs base="):
        evolve(models, lambda sd: 0.0, budget=10, method="dare", progress=False)
    with pytest.raises(ValueError, match="slerp merges exactly 2 models"):
        evolve(models, lambda sd: 0.0, budget=10, method="slerp", progress=False)
    with pytest.raises(MergeError, match=r"params \['density'\] do not apply to linear"):
        evolve(models, lambda sd: 0.0, budget=10, params={"density": 0.5}, progress=False)
