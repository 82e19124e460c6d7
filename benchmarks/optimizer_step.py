"""Seconds per `optimizer.step()` of AdamW and of Muon + AdamW on a preset's model, with random gradients.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py [PRESET ...]   # default: tiny cognate-25m

One torch thread; each optimizer takes one untimed step (its state is created there), then the best of 3 timed
steps. Prints one JSON object: preset -> {"adamw_s", "muon_s", "ratio"} (docs/optim.md quotes it).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from cognate.model.config import get_preset
from cognate.model.model import CognateModel
from cognate.optim import make_optimizer, preset

REPEATS = 3


def seconds_per_step(model: torch.nn.Module, kind: str) -> float:
    optimizer = make_optimizer(model, kind, preset("phase1-reduced"))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


def main(presets: list[str]) -> dict:
    torch.set_num_threads(1)
    result = {}
    for name in presets:
        torch.manual_seed(0)
        model = CognateModel(get_preset(name))
        adamw, muon = seconds_per_step(model, "adamw"), seconds_per_step(model, "muon")
        result[name] = {"adamw_s": round(adamw, 4), "muon_s": round(muon, 4), "ratio": round(muon / adamw, 2)}
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or ["tiny", "cognate-25m"])))
