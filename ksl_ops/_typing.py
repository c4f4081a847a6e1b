"""Types shared by the public API's annotations."""
import os
from typing import Literal, Union

# How a loss op reduces its per-term values: every term ("none"), their mean, or their sum.
Reduction = Literal["none", "mean", "sum"]

# Which implementation computes a loss: the compiled kernels, or the pure-PyTorch reference.
Backend = Literal["fused", "reference"]

# How the training loader draws its batches: shuffled images, or P identities × K images each.
Sampler = Literal["random", "pk"]

# The names of ksl_ops.recipes.RECIPES (tests/test_recipe.py checks that the two agree).
Recipe = Literal["paper", "ksl-ops"]

# A file or folder argument: a string or a path object.
StrPath = Union[str, "os.PathLike[str]"]
