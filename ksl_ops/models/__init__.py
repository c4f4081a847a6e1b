"""Backbones and isomorphic auxiliary branches for KSL.

    model = build_backbone("cmsnet", num_classes=751)   # or "mobilenetv2", "shufflenetv2"
    net = with_isomorphic_branches(model)                # branches at model.default_taps
    net = with_isomorphic_branches(any_model, taps=["layer3", "layer4"], init="copy")  # any model (isomorphic.py)
    net.train(); outs = net(x)        # [(logits, emb)] * B, main branch first
    net.eval();  emb = net(x)         # main-branch 512-D embedding
    count_params(model), count_flops(model, 256, 128)

All networks are plain ``torch.nn`` and initialised from scratch (the paper's "KSL-scratch").
"""
from __future__ import annotations

from torch import nn

from .cmsnet import CMSNet
from .flops import count_flops, count_params
from .head import FEATURE_DIM, NECKS, Neck, ReIDBackbone, ReIDHead, init_weights
from .isomorphic import AuxiliaryBranch, IsomorphicNet, TracedIsomorphicNet, with_isomorphic_branches
from .mobilenetv2 import MobileNetV2
from .shufflenetv2 import ShuffleNetV2

__all__ = [
    "BACKBONES",
    "build_backbone",
    "with_isomorphic_branches",
    "IsomorphicNet",
    "TracedIsomorphicNet",
    "AuxiliaryBranch",
    "ReIDBackbone",
    "ReIDHead",
    "CMSNet",
    "MobileNetV2",
    "ShuffleNetV2",
    "count_params",
    "count_flops",
    "init_weights",
    "FEATURE_DIM",
    "NECKS",
    "Neck",
]

BACKBONES = {
    "cmsnet": CMSNet,
    "mobilenetv2": MobileNetV2,
    "shufflenetv2": ShuffleNetV2,
}


def build_backbone(name: str, num_classes: int = 751, neck: Neck = "fc") -> nn.Module:
    """A freshly initialised backbone with the Re-ID head; ``name`` in :data:`BACKBONES`.

    ``neck`` says which head tensor is the embedding (:data:`ksl_ops.models.NECKS`): ``"fc"`` (the
    paper's FC-512 output, default), ``"bnneck"`` (the BN output) or ``"osnet"`` (ReLU(BN(FC))).
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[key](num_classes=num_classes, neck=neck)
