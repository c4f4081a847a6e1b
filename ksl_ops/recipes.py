"""KSL training recipes: what the KSL losses are fed, and when. The one table that `KSLLoss`,
`TrainConfig` and the `ksl train` CLI all read.

The ops always compute the paper's equations; a recipe only chooses

- `neck`: which head tensor is the embedding (a model option: `build_backbone(..., neck=)`);
- `normalize_e`: whether KSL-E (eq. 7-10) is fed L2-normalised embeddings;
- `normalize_triplet`: whether the triplets (eq. 2) and KSL-H (eq. 11) are fed L2-normalised embeddings;
- `consensus_start_epoch`: when KSL-P and KSL-E start: None (from the first epoch), a 0-based epoch, or
  "triplet" (with the triplets, i.e. at `triplet_start_epoch`; 150/350 of the schedule in the paper);
- `weight_e`: the weight of KSL-E's two terms in the total (eq. 1 has every weight 1).

| recipe | neck | normalize_e | normalize_triplet | consensus_start_epoch | weight_e |
|---|---|---|---|---|---|
| `"ksl-ops"` (default) | fc | True | True | "triplet" (with the triplets) | 1.0 |
| `"paper"` | fc | False | False | None (from the first epoch) | 1.0 |

"paper" is the paper's text taken literally. From scratch it collapses training here: on raw
embeddings the six unit-weight distance terms of KSL-E/KSL-H are lowered by shrinking every embedding
towards 0, and that gradient dominates cross-entropy (docs/recipe.md: validation R1 22.9
against 66.7 for AUX). "ksl-ops" is the recipe chosen by measurement on a validation split, the default
of both `KSLLoss` and `ksl train`. Any option given explicitly overrides the recipe's value.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ._typing import Recipe

__all__ = ["RECIPES", "DEFAULT_RECIPE", "RECIPE_FIELDS", "LOSS_RECIPE_FIELDS", "check_recipe", "recipe_value"]

RECIPES: Dict[Recipe, Dict[str, Any]] = {
    "paper": dict(neck="fc", normalize_e=False, normalize_triplet=False, consensus_start_epoch=None, weight_e=1.0),
    "ksl-ops": dict(neck="fc", normalize_e=True, normalize_triplet=True, consensus_start_epoch="triplet",
                    weight_e=1.0),
}

DEFAULT_RECIPE: Recipe = "ksl-ops"

# Every field of a recipe, and those that KSLLoss reads (the neck belongs to the model).
RECIPE_FIELDS = ("neck", "normalize_e", "normalize_triplet", "consensus_start_epoch", "weight_e")
LOSS_RECIPE_FIELDS = ("normalize_e", "normalize_triplet", "consensus_start_epoch", "weight_e")


def check_recipe(recipe: object) -> Recipe:
    """`recipe` if it names a recipe, else a ValueError naming the choices."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
    return recipe


def recipe_value(recipe: str, name: str, explicit: Optional[Any] = None) -> Any:
    """The value of option `name`: `explicit` if given (not None), else recipe `recipe`'s."""
    if name not in RECIPE_FIELDS:
        raise KeyError(f"{name!r} is not a recipe field; the fields are {list(RECIPE_FIELDS)}")
    return RECIPES[check_recipe(recipe)][name] if explicit is None else explicit
