"""Isomorphic auxiliary branches (KSL paper §3.1, Figure 4).

An auxiliary branch attached at the *input* of stage ``tap`` is a copy of that stage, of every later
stage and of the head -- the same structure as the rest of the main branch ("isomorphic"), so every
branch yields logits and a 512-D embedding the consensus losses can compare. The copies are
re-initialised from scratch: branches that start from the main branch's weights would agree from
the first step and the consensus losses would have nothing to distil.

Only the stem and the stages before a tap are shared. At inference the branches are dropped:
eval mode runs the main branch alone, and :meth:`IsomorphicNet.main_branch` returns the plain base
model (the very same module, so its parameters, count, FLOPs and outputs are the base model's).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .head import init_weights

__all__ = ["IsomorphicNet", "AuxiliaryBranch", "with_isomorphic_branches"]


class AuxiliaryBranch(nn.Module):
    """Copies of the stages from the tap on, plus a copy of the head."""

    def __init__(self, tap: str, stages: nn.ModuleDict, head: nn.Module):
        super().__init__()
        self.tap = tap
        self.stages = stages
        self.head = head

    def forward(self, x: torch.Tensor):
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


class IsomorphicNet(nn.Module):
    """A base model plus one isomorphic auxiliary branch per tap.

    Train mode: ``net(x) -> [(logits, emb), ...]``, the main branch first, then one entry per tap in
    the order the taps were given. Eval mode: ``net(x) -> emb`` of the main branch.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] | str | None = None):
        super().__init__()
        for attr in ("stem", "stages", "head"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must be a backbone with .stem, .stages and .head (see "
                    f"ksl_ops.models.build_backbone); {type(model).__name__} has no .{attr}")
        if not isinstance(model.stages, nn.ModuleDict):
            raise TypeError("model.stages must be an nn.ModuleDict of named stages")
        stage_names = list(model.stages.keys())
        if taps is None:
            taps = getattr(model, "default_taps", None)
            if taps is None:
                raise ValueError(f"model has no default_taps; pass taps= a list of stage names "
                                 f"from {stage_names}")
        if isinstance(taps, str):
            taps = [taps]
        taps = list(taps)
        bad = [t for t in taps if not isinstance(t, str) or t not in model.stages]
        if bad:
            raise ValueError(f"taps {bad!r} are not stages of {type(model).__name__}; "
                             f"valid stage names: {stage_names}")
        dupes = sorted({t for t in taps if taps.count(t) > 1})
        if dupes:
            raise ValueError(f"taps must be distinct, {dupes!r} given more than once "
                             f"(valid stage names: {stage_names})")

        self.base = model
        self.taps = taps
        reinit = getattr(model, "init_weights", init_weights)
        branches = []
        for tap in taps:
            later = stage_names[stage_names.index(tap):]
            stages = nn.ModuleDict((name, copy.deepcopy(model.stages[name])) for name in later)
            branch = AuxiliaryBranch(tap, stages, copy.deepcopy(model.head))
            reinit(branch)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)

    @property
    def num_branches(self) -> int:
        """B: the main branch plus one per tap."""
        return 1 + len(self.branches)

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def feature_dim(self) -> int:
        return self.base.feature_dim

    def main_branch(self) -> nn.Module:
        """The plain base model (shares every parameter with this net; no branch attached)."""
        return self.base

    def forward(self, x: torch.Tensor):
        if not self.training:
            return self.base(x)
        base = self.base
        x = base.stem(x)
        tapped = {}
        for name, stage in base.stages.items():
            tapped[name] = x  # the input of this stage: what a branch tapping here consumes
            x = stage(x)
        outputs = [base.head(x)]
        for branch in self.branches:
            outputs.append(branch(tapped[branch.tap]))
        return outputs


def with_isomorphic_branches(model: nn.Module, taps: Iterable[str] | str | None = None) -> IsomorphicNet:
    """Attach one re-initialised isomorphic branch per tap (stage name) to ``model``.

    ``taps=None`` uses ``model.default_taps`` (the paper's positions); ``taps=[]`` gives B = 1.
    """
    return IsomorphicNet(model, taps)
