"""A merge recipe: which models, which method, which weights (global and per layer), saved as YAML and replayed.

A recipe names its models; `apply_recipe` looks them up in a name -> state dict table, so the same YAML replays
on the same checkpoints to bit-identical weights. Every method parameter is written out (defaults included), so a
recipe does not change meaning if a default changes later.

Per-layer weights are keyed by the layer index found in a tensor's name (`blocks.3.` or `layers.3.`, e.g.
`blocks.3.attn.wq.weight` or `model.layers.3.mlp.up_proj.weight`); tensors outside any layer (embeddings, final
norm, head) and layers without an entry use the global `weights`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cognate.merge import methods
from cognate.merge.compat import check_compatible
from cognate.merge.methods import MergeError, StateDict

LAYER_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")

# Each method's parameters and their defaults (the ones mergekit uses for ties / dare_linear / dare_ties).
METHOD_PARAMS: dict[str, dict[str, object]] = {
    "linear": {"normalize": True},
    "slerp": {},
    "ties": {"density": 0.5, "scale": 1.0, "normalize": True},
    "dare": {"density": 0.5, "rescale": True, "combine": "linear", "scale": 1.0, "normalize": False},
}
NEEDS_BASE = ("ties", "dare")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, from `blocks.{i}.` / `layers.{i}.` in its name; None outside the layers."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Recipe:
    """How to merge: `weights` has one entry per model; `layer_weights` overrides it for some layers.

    SLERP takes exactly two models and reads each weight pair (w_a, w_b) as the fraction t = w_b / (w_a + w_b)
    towards the second model, so every method is searched and stored the same way.
    """

    method: str
    models: tuple[str, ...]
    weights: tuple[float, ...]
    base: str | None = None
    layer_weights: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    params: Mapping[str, object] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the containers once, here
        set_(self, "models", tuple(self.models))
        set_(self, "weights", tuple(float(w) for w in self.weights))
        set_(
            self, "layer_weights", {int(k): tuple(float(w) for w in v) for k, v in self.layer_weights.items()}
        )
        if self.method in METHOD_PARAMS:
            set_(self, "params", {**METHOD_PARAMS[self.method], **self.params})
        problems = list(_recipe_problems(self))
        if problems:
            raise MergeError("invalid merge recipe: " + "; ".join(problems))

    def weights_for(self, tensor_name: str) -> tuple[float, ...]:
        """The weights this recipe gives the tensor: its layer's, else the global ones."""
        return self.layer_weights.get(layer_index(tensor_name), self.weights)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["models"] = list(self.models)
        values["weights"] = list(self.weights)
        values["layer_weights"] = {k: list(v) for k, v in sorted(self.layer_weights.items())}
        values["params"] = dict(self.params)
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MergeError(f"invalid merge recipe: unknown field(s) {unknown}; known: {sorted(known)}")
        missing = sorted({"method", "models", "weights"} - set(values))
        if missing:
            raise MergeError(f"invalid merge recipe: missing field(s) {missing}")
        return cls(
            **{
                **values,
                "layer_weights": values.get("layer_weights") or {},
                "params": values.get("params") or {},
            }
        )

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML (floats are written with repr, so they load back bit-identical)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        values = yaml.safe_load(Path(path).read_text())
        if not isinstance(values, Mapping):
            raise MergeError(f"{path}: a merge recipe must be a YAML mapping, got {type(values).__name__}")
        return cls.from_dict(values)


def apply_recipe(recipe: Recipe, state_dicts: Mapping[str, StateDict]) -> StateDict:
    """Merge the recipe's models (looked up by name in `state_dicts`); deterministic: same inputs, same bits."""
    names = [*recipe.models, *([recipe.base] if recipe.base is not None else [])]
    absent = [n for n in names if n not in state_dicts]
    if absent:
        raise MergeError(
            f"the recipe names model(s) {absent} that were not given; given: {sorted(state_dicts)}"
        )
    check_compatible({n: state_dicts[n] for n in dict.fromkeys(names)})
    models = [state_dicts[n] for n in recipe.models]
    _check_layers_exist(recipe, models[0])
    weights = {name: recipe.weights_for(name) for name, t in models[0].items() if t.is_floating_point()}
    p = recipe.params
    if recipe.method == "linear":
        return methods.linear(models, weights, normalize=p["normalize"])
    if recipe.method == "slerp":
        return methods.slerp(models[0], models[1], {name: _slerp_fraction(w) for name, w in weights.items()})
    base = state_dicts[recipe.base]
    if recipe.method == "ties":
        return methods.ties(base, models, weights, p["density"], p["scale"], p["normalize"])
    return methods.dare(
        base,
        models,
        weights,
        p["density"],
        recipe.seed,
        p["rescale"],
        p["combine"],
        p["scale"],
        p["normalize"],
    )


def _slerp_fraction(weights: tuple[float, ...]) -> float:
    w_a, w_b = weights
    return w_b / (w_a + w_b)


def _check_layers_exist(recipe: Recipe, state_dict: StateDict) -> None:
    present = {layer_index(name) for name in state_dict} - {None}
    unknown = sorted(set(recipe.layer_weights) - present)
    if unknown:
        raise MergeError(
            f"the recipe has weights for layer(s) {unknown} but the models have layers {sorted(present)}"
        )


def _recipe_problems(recipe: Recipe):
    if recipe.method not in METHOD_PARAMS:
        yield f"method must be one of {sorted(METHOD_PARAMS)}, got {recipe.method!r}"
        return
    n = len(recipe.models)
    if n == 0:
        yield "models must name at least one model"
    if len(set(recipe.models)) != n:
        yield f"models must be distinct, got {list(recipe.models)}"
    if recipe.method == "slerp" and n != 2:
        yield f"slerp merges exactly 2 models, got {n}"
    if recipe.method in NEEDS_BASE and recipe.base is None:
        yield f"{recipe.method} needs a base model (task vectors are model - base)"
    if recipe.method not in NEEDS_BASE and recipe.base is not None:
        yield f"{recipe.method} takes no base model, got base={recipe.base!r}"
    for where, weights in [("weights", recipe.weights)] + [
        (f"layer_weights[{k}]", v) for k, v in recipe.layer_weights.items()
    ]:
        if len(weights) != n:
            yield f"{where} has {len(weights)} entries for {n} models"
        if not all(math.isfinite(w) for w in weights):
            yield f"{where} must be finite numbers, got {list(weights)}"
        if recipe.method == "slerp" and (any(w < 0 for w in weights) or sum(weights) <= 0):
            yield f"{where}: slerp weights must be >= 0 with a positive sum, got {list(weights)}"
        if recipe.method == "linear" and recipe.params.get("normalize") and abs(math.fsum(weights)) < 1e-12:
            yield f"{where}: normalized linear weights must not sum to 0, got {list(weights)}"
    if any(k < 0 for k in recipe.layer_weights):
        yield f"layer_weights keys are layer indices >= 0, got {sorted(recipe.layer_weights)}"
    yield from _param_problems(recipe.method, recipe.params)


def _param_problems(method: str, params: Mapping[str, object]):
    defaults = METHOD_PARAMS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        yield f"params {unknown} do not apply to {method} (it takes {sorted(defaults) or 'none'})"
    for key, default in defaults.items():
        value = params.get(key, default)
        if isinstance(default, bool) and not isinstance(value, bool):
            yield f"params.{key} must be true or false, got {value!r}"
        elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            yield f"params.{key} must be a number, got {value!r}"
    density = params.get("density")
    if isinstance(density, int | float) and not 0.0 < density <= 1.0:
        yield f"params.density must be in (0, 1], got {density}"
    if method == "dare" and params.get("combine") not in ("linear", "ties"):
        yield f"params.combine must be 'linear' or 'ties', got {params.get('combine')!r}"
