"""`cognate merge`: merge model folders by a method, a saved recipe, or an evolutionary search over recipes.

    cognate merge --models A B C --method linear --out OUT
    cognate merge --models A B --base BASE --method ties --density 0.5 --out OUT
    cognate merge --recipe OUT/recipe.yaml --out OUT2          (replays to identical weights)
    cognate merge --models A B C --evolve --data DIR --budget 40 --out OUT

The merged model is written as a model folder (same layout as a seed, hf_format/ included) with recipe.yaml
beside it; --evolve also writes evolve_history.json with every candidate's fitness.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cognate.errors import UsageError, check_model_folder
from cognate.merge.compat import check_compatible, tokenizer_hash
from cognate.merge.evolve import evolve, save_history
from cognate.merge.recipe import METHOD_PARAMS, Recipe, apply_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", type=Path, help="model folders to merge")
    parser.add_argument("--base", type=Path, help="the model task vectors are taken against (ties, dare)")
    parser.add_argument("--method", choices=sorted(METHOD_PARAMS), default="linear")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (default: equal)")
    parser.add_argument("--density", type=float, help="share of each task vector kept (ties, dare)")
    parser.add_argument("--recipe", type=Path, help="replay a saved recipe.yaml instead of --method")
    parser.add_argument("--evolve", action="store_true", help="search per-layer weights with CMA-ES")
    parser.add_argument("--data", type=Path, help="prepared data folder whose validation loss is the fitness")
    parser.add_argument("--budget", type=int, default=40, help="evaluations the search may spend")
    parser.add_argument(
        "--eval-batches", type=int, default=8, help="validation batches per fitness evaluation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged model")


def run(args: argparse.Namespace) -> int:
    from cognate.data.tokenizer import load_tokenizer
    from cognate.export.model_dir import WEIGHTS, load_model_dir, save_model_dir

    recipe = Recipe.load(args.recipe) if args.recipe else None
    folders = _folders(args, recipe)
    if args.evolve and args.data is None:
        raise UsageError("--evolve needs --data: the fitness is the validation loss on its held-out rows")
    if recipe is None and not args.evolve:  # settings checked before any weights are read
        recipe = _recipe_from_args(args, folders)
    for folder in folders:
        check_model_folder(folder)
    states = {str(folder): load_file(folder / WEIGHTS) for folder in folders}
    check_compatible(states, tokenizer_hashes={str(f): tokenizer_hash(f) for f in folders})
    template = load_model_dir(folders[0])
    history = None
    if args.evolve:
        fitness = validation_loss_fn(template, args.data, args.eval_batches)
        recipe, history = evolve(
            states,
            fitness,
            budget=args.budget,
            seed=args.seed,
            method=args.method,
            base=str(args.base) if args.base else None,
        )
    merged = apply_recipe(recipe, states)
    template.load_state_dict(merged)
    stats = {"merge": {"recipe": str(args.out / "recipe.yaml"), "models": [str(f) for f in folders]}}
    if args.data is not None:
        stats["metrics"] = {"val_loss": validation_loss_fn(template, args.data, args.eval_batches)(merged)}
    save_model_dir(template, args.out, tokenizer=load_tokenizer(folders[0]), stats=stats)
    recipe.save(args.out / "recipe.yaml")
    if history is not None:
        save_history(history, args.out / "evolve_history.json")
    print(json.dumps({"out": str(args.out), "method": recipe.method, **stats.get("metrics", {})}))
    return 0


def _folders(args: argparse.Namespace, recipe: Recipe | None) -> list[Path]:
    if recipe is not None:
        names = [*recipe.models, *([recipe.base] if recipe.base else [])]
        return [Path(name) for name in names]
    if not args.models:
        raise UsageError("give --models (or --recipe)")
    return [*args.models, *([args.base] if args.base else [])]


def _recipe_from_args(args: argparse.Namespace, folders: list[Path]) -> Recipe:
    models = tuple(str(f) for f in args.models)
    params = {"density": args.density} if args.density is not None else {}
    return Recipe(
        method=args.method,
        models=models,
        weights=tuple(args.weights or [1.0] * len(models)),
        base=str(args.base) if args.base else None,
        params=params,
        seed=args.seed,
    )


def validation_loss_fn(model, data_dir: Path, eval_batches: int, bf16: bool | str = "auto"):
    """fitness(state_dict) -> validation loss of `model` carrying those weights, on a fixed held-out subset."""
    from cognate.train.data import TrainingData
    from cognate.train.distributed import Distributed
    from cognate.train.precision import autocast_for, resolve_precision
    from cognate.train.trainer import validate

    dist = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    data = TrainingData(data_dir, batch_size=8, seed=0, dist=dist)
    autocast = autocast_for(dist.device, resolve_precision(bf16, dist.device).bf16)

    def fitness(state_dict) -> float:
        model.load_state_dict(state_dict)
        return validate(model, data, eval_batches, autocast, dist)["val_loss"]

    return fitness
