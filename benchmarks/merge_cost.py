"""Seconds of one `apply_recipe` per merge method, for models shaped like `cognate-25m` (docs/merge.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/merge_cost.py

Three float32 models with random weights (plus a fourth as the base of TIES and DARE), one torch thread, best of
3. Prints one JSON object: the parameter count per model and the seconds per method.
"""

from __future__ import annotations

import json
import time

import torch

from cognate.merge import Recipe, apply_recipe
from cognate.model.config import get_preset
from cognate.model.model import CognateModel

MODELS = ("seed-42", "seed-1337", "seed-2023")
RECIPES = {
    "linear": Recipe("linear", MODELS, (1.0, 1.0, 1.0)),
    "slerp": Recipe("slerp", MODELS[:2], (0.7, 0.3)),
    "ties": Recipe("ties", MODELS, (1.0, 1.0, 1.0), base="base"),
    "dare_linear": Recipe("dare", MODELS, (1.0, 1.0, 1.0), base="base"),
    "dare_ties": Recipe("dare", MODELS, (1.0, 1.0, 1.0), base="base", params={"combine": "ties"}),
}


def main() -> dict:
    torch.set_num_threads(1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CognateModel(get_preset("cognate-25m")).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    states = {
        name: {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
        for name in (*MODELS, "base")
    }
    result = {"parameters_per_model": sum(shape.numel() for shape in shapes.values())}
    for name, recipe in RECIPES.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            apply_recipe(recipe, states)
            times.append(time.perf_counter() - start)
        result[f"{name}_s"] = round(min(times), 3)
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
