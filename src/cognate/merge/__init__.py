"""Merging seed models (EvoMerge): merge methods over state dicts, replayable recipes, and a CMA-ES recipe search.

See docs/merge.md.
"""

from cognate.merge.compat import IncompatibleModelsError, check_compatible, tokenizer_hash
from cognate.merge.evolve import Candidate, evolve, save_history
from cognate.merge.methods import MergeError, dare, linear, slerp, ties
from cognate.merge.recipe import Recipe, apply_recipe, layer_index

__all__ = [
    "Candidate",
    "IncompatibleModelsError",
    "MergeError",
    "Recipe",
    "apply_recipe",
    "check_compatible",
    "dare",
    "evolve",
    "layer_index",
    "linear",
    "save_history",
    "slerp",
    "ties",
    "tokenizer_hash",
]
