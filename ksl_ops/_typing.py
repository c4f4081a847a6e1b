"""Types shared by the public API's annotations."""
from typing import Literal

# How a loss op reduces its per-term values: every term ("none"), their mean, or their sum.
Reduction = Literal["none", "mean", "sum"]
