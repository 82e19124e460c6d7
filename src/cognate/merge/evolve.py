"""Evolutionary search over merge recipes: CMA-ES (the `cma` package) on per-layer weights and method parameters.

The search vector holds one weight per model for the tensors outside the layers, one weight per model for each
layer (when `per_layer`), and, for TIES and DARE, the density. Weights live in [0, 1] (normalised methods are
scale-invariant, so this loses nothing for them), density in [0.05, 1]. Before the search, the plain average and
each single model are evaluated as reference candidates, so the result is never worse than the best of them.
Every evaluation counts against `budget`; fitness is lower-is-better (a validation loss).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cma
import numpy as np
from tqdm import tqdm

from cognate.merge.compat import check_compatible
from cognate.merge.methods import MergeError, StateDict
from cognate.merge.recipe import METHOD_PARAMS, NEEDS_BASE, Recipe, apply_recipe, layer_index

WEIGHT_BOUNDS = (0.0, 1.0)
DENSITY_BOUNDS = (0.05, 1.0)

FitnessFn = Callable[[StateDict], float]


@dataclass(frozen=True)
class Candidate:
    """One evaluated recipe. `kind` is "reference" (average / single model) or "search" (proposed by CMA-ES)."""

    index: int
    kind: str
    generation: int  # 0 for the references, then 1, 2, ... for CMA-ES generations
    recipe: Recipe | None  # None when the proposed vector did not make a valid recipe (see `error`)
    fitness: float  # math.inf when the merge failed or the fitness was not finite
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "kind": self.kind,
            "generation": self.generation,
            "fitness": self.fitness if math.isfinite(self.fitness) else None,
            "error": self.error,
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
        }


@dataclass(frozen=True)
class SearchSpace:
    """Maps a CMA-ES vector to a recipe: [global weights, weights of each layer..., density?]."""

    method: str
    models: tuple[str, ...]
    base: str | None
    layers: tuple[int, ...]
    params: Mapping[str, object]
    search_density: bool
    seed: int

    @property
    def dim(self) -> int:
        return len(self.models) * (1 + len(self.layers)) + int(self.search_density)

    def bounds(self) -> tuple[list[float], list[float]]:
        n_weights = self.dim - int(self.search_density)
        lower = [WEIGHT_BOUNDS[0]] * n_weights + [DENSITY_BOUNDS[0]] * int(self.search_density)
        upper = [WEIGHT_BOUNDS[1]] * n_weights + [DENSITY_BOUNDS[1]] * int(self.search_density)
        return lower, upper

    def start(self) -> list[float]:
        """The plain average (every weight 1/n) at the method's density."""
        x = [1.0 / len(self.models)] * (self.dim - int(self.search_density))
        return x + ([float(self.params["density"])] if self.search_density else [])

    def decode(self, x: np.ndarray) -> Recipe:
        lower, upper = self.bounds()
        values = [float(v) for v in np.clip(np.asarray(x, dtype=np.float64), lower, upper)]
        n = len(self.models)
        groups = [tuple(values[i * n : (i + 1) * n]) for i in range(1 + len(self.layers))]
        params = dict(self.params)
        if self.search_density:
            params["density"] = values[-1]
        return Recipe(
            method=self.method,
            models=self.models,
            weights=groups[0],
            base=self.base,
            layer_weights=dict(zip(self.layers, groups[1:])),
            params=params,
            seed=self.seed,
        )


def reference_recipes(models: tuple[str, ...]) -> list[Recipe]:
    """The plain average of all models, then each model alone (a one-model linear recipe copies it exactly)."""
    average = Recipe(method="linear", models=models, weights=(1.0,) * len(models))
    return [average] + [Recipe(method="linear", models=(name,), weights=(1.0,)) for name in models]


def evolve(
    state_dicts: Mapping[str, StateDict],
    fitness_fn: FitnessFn,
    budget: int,
    seed: int = 0,
    method: str = "linear",
    base: str | None = None,
    per_layer: bool = True,
    params: Mapping[str, object] | None = None,
    search_density: bool = True,
    sigma0: float = 0.2,
    popsize: int | None = None,
    progress: bool = True,
) -> tuple[Recipe, list[Candidate]]:
    """Search merge recipes for the lowest `fitness_fn(merged_state_dict)` within `budget` evaluations.

    `state_dicts` maps model names to weights; the models merged are all of them except `base` (the reference
    point of TIES/DARE task vectors). `params` fixes method parameters (e.g. {"combine": "ties"} for DARE);
    `search_density` lets CMA-ES tune TIES/DARE density too. Deterministic for a seed when `fitness_fn` is.
    Returns the best recipe and every candidate in evaluation order.
    """
    space = _search_space(
        state_dicts, budget, seed, method, base, per_layer, params, search_density, sigma0, popsize
    )
    space.decode(space.start())  # raises MergeError now, not per candidate, if `params` are invalid
    check_compatible(state_dicts)
    references = reference_recipes(space.models)
    if budget < len(references):
        raise ValueError(
            f"budget={budget} is below the {len(references)} reference candidates (the average and each model)"
        )

    history: list[Candidate] = []
    bar = tqdm(total=budget, desc=f"evolve {method}", unit="merge", disable=not progress)

    def evaluate(recipe: Recipe | str, kind: str, generation: int) -> float:
        candidate = _evaluate(len(history), kind, generation, recipe, state_dicts, fitness_fn)
        history.append(candidate)
        bar.update(1)
        bar.set_postfix(best=f"{min(c.fitness for c in history):.4g}", generation=generation)
        return candidate.fitness

    for recipe in references:
        evaluate(recipe, "reference", 0)

    lower, upper = space.bounds()
    # cma reads seed 0 as "seed from the clock", hence the +1.
    options = {"bounds": [lower, upper], "seed": seed + 1, "verbose": -9}
    if popsize is not None:
        options["popsize"] = popsize
    strategy = cma.CMAEvolutionStrategy(space.start(), sigma0, options)
    generation = 0
    while len(history) < budget and not strategy.stop():
        generation += 1
        xs = strategy.ask()
        fitnesses = []
        for x in xs[: budget - len(history)]:
            try:
                proposal: Recipe | str = space.decode(x)
            except MergeError as error:
                proposal = str(error)
            fitnesses.append(evaluate(proposal, "search", generation))
        if len(fitnesses) < len(xs):
            break  # budget spent mid-generation; a partial generation cannot update CMA-ES
        strategy.tell(xs, _rankable(fitnesses, history))
    bar.close()

    best = min((c for c in history if c.recipe is not None), key=lambda c: c.fitness)
    if not math.isfinite(best.fitness):
        raise RuntimeError(f"no candidate had a finite fitness; the first failed with: {history[0].error}")
    return best.recipe, history


def save_history(history: list[Candidate], path: str | Path) -> None:
    """Write every candidate (recipe, fitness, error) as one JSON document, in evaluation order."""
    Path(path).write_text(json.dumps([c.to_dict() for c in history], indent=1) + "\n")


def _evaluate(
    index: int,
    kind: str,
    generation: int,
    recipe: Recipe | str,
    state_dicts: Mapping[str, StateDict],
    fitness_fn: FitnessFn,
) -> Candidate:
    if isinstance(recipe, str):  # the vector made no valid recipe; the string says why
        return Candidate(index, kind, generation, None, math.inf, recipe)
    try:
        merged = apply_recipe(recipe, state_dicts)
    except MergeError as error:
        return Candidate(index, kind, generation, recipe, math.inf, str(error))
    fitness = float(fitness_fn(merged))
    if not math.isfinite(fitness):
        return Candidate(index, kind, generation, recipe, math.inf, f"fitness was {fitness}")
    return Candidate(index, kind, generation, recipe, fitness)


def _rankable(fitnesses: list[float], history: list[Candidate]) -> list[float]:
    """CMA-ES only ranks fitness values: tell it a failed candidate is worse than every finite one seen."""
    finite = [c.fitness for c in history if math.isfinite(c.fitness)]
    worst = max(finite) + 1.0 if finite else 1.0
    return [f if math.isfinite(f) else worst for f in fitnesses]


def _search_space(
    state_dicts: Mapping[str, StateDict],
    budget: int,
    seed: int,
    method: str,
    base: str | None,
    per_layer: bool,
    params: Mapping[str, object] | None,
    search_density: bool,
    sigma0: float,
    popsize: int | None,
) -> SearchSpace:
    problems = []
    if method not in METHOD_PARAMS:
        problems.append(f"method must be one of {sorted(METHOD_PARAMS)}, got {method!r}")
    if method in NEEDS_BASE and base is None:
        problems.append(f"method={method} needs base= (the model task vectors are measured from)")
    if base is not None and base not in state_dicts:
        problems.append(f"base={base!r} is not one of the models {sorted(state_dicts)}")
    models = tuple(name for name in state_dicts if name != base)
    if len(models) < 2:
        problems.append(f"evolve needs at least 2 models to merge, got {list(models)}")
    if method == "slerp" and len(models) != 2:
        problems.append(f"slerp merges exactly 2 models, got {len(models)}: {list(models)}")
    if budget < 1:
        problems.append(f"budget must be >= 1, got {budget}")
    if seed < 0:
        problems.append(f"seed must be >= 0, got {seed}")
    if not sigma0 > 0:
        problems.append(f"sigma0 must be > 0, got {sigma0}")
    if popsize is not None and popsize < 2:
        problems.append(f"popsize must be >= 2, got {popsize}")
    if problems:
        raise ValueError("invalid evolve settings: " + "; ".join(problems))
    first = next(iter(state_dicts.values()))
    layers = tuple(sorted({layer_index(name) for name in first} - {None})) if per_layer else ()
    full_params = {**METHOD_PARAMS[method], **(params or {})}
    return SearchSpace(
        method=method,
        models=models,
        base=base,
        layers=layers,
        params=full_params,
        search_density=search_density and "density" in full_params,
        seed=seed,
    )
