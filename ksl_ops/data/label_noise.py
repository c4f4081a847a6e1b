"""Synthetic label noise for the robustness study of the paper's Figure 6.

The paper corrupts a fixed *fraction of the whole training set* and draws the corrupted samples anew
every epoch ("Noisy labels are randomly generated in each epoch. Noise Level is the ratio of noisy
labels over the all training set"). :func:`noisy_labels` does exactly that for one epoch: it picks
``round(fraction * n)`` samples without replacement and gives each a *different* identity drawn
uniformly from the other ``num_classes - 1``, so the realised noise level is the asked one (up to
rounding), not an expectation. It depends only on ``seed``: the trainer passes a seed made of
(run seed, epoch), so every row of a paired-seed comparison sees the same corrupted samples, and a
resumed run the same as an uninterrupted one.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["noisy_labels"]


def noisy_labels(labels: Sequence[int], num_classes: int, fraction: float, seed: int) -> List[int]:
    """A copy of ``labels`` (training identities in ``[0, num_classes)``) with ``round(fraction * n)``
    entries replaced by a uniformly drawn *wrong* identity. Deterministic in ``seed``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError("noisy_labels: num_classes must be an int >= 2 (a wrong label must exist), "
                         f"got {num_classes!r}")
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"noisy_labels: fraction must be in [0, 1), got {fraction}")
    out = [int(y) for y in labels]
    bad = [y for y in out if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"noisy_labels: labels must lie in [0, {num_classes}), got e.g. {bad[0]}")
    n_noisy = int(round(fraction * len(out)))
    if n_noisy == 0:
        return out
    g = torch.Generator().manual_seed(int(seed))
    which = torch.randperm(len(out), generator=g)[:n_noisy]
    # An offset in [1, num_classes) added modulo num_classes is uniform over the other identities.
    offsets = torch.randint(1, num_classes, (n_noisy,), generator=g)
    for i, off in zip(which.tolist(), offsets.tolist()):
        out[i] = (out[i] + off) % num_classes
    return out
