"""Pieces shared by the three backbones: the Re-ID head, the backbone skeleton and the initialisation.

Every backbone is ``stem -> stages (ordered, named) -> head``. Keeping that shape identical across
backbones is what lets :func:`ksl_ops.models.with_isomorphic_branches` attach a branch at the input of
any named stage without knowing which network it is looking at.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Literal, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["ConvBNAct", "ReIDHead", "NECKS", "Neck", "HeadOutput", "check_neck", "ReIDBackbone", "init_weights",
           "FEATURE_DIM"]

#: Width of the embedding the KSL losses and retrieval use (paper §4.2: "512-D embedding features
#: from the fully-connected layer").
FEATURE_DIM = 512


class ConvBNAct(nn.Sequential):
    """Convolution (no bias: the BN right after it makes a bias redundant) -> BatchNorm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ):
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


#: Where the embedding is taken in the head (``build_backbone(..., neck=...)``):
#:
#: - ``"fc"``: the FC-512 output before the BN, the paper's Figure 2 ("512-D embedding features from the
#:   fully-connected layer"); the BN only conditions the classifier input.
#: - ``"bnneck"``: the BN output (the classifier's input) is the embedding: its scale is the BN's affine
#:   weight, not the FC's output scale.
#: - ``"osnet"``: ReLU(BN(FC)) is the embedding and the classifier input, as torchreid's OSNet head.
Neck = Literal["fc", "bnneck", "osnet"]
NECKS: Tuple[Neck, ...] = ("fc", "bnneck", "osnet")

# What a head (and a ReIDBackbone) returns: the embedding in eval mode, (logits, embedding) in training.
HeadOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def check_neck(neck: object) -> Neck:
    if neck not in NECKS:
        raise ValueError(f"neck must be one of {NECKS}, got {neck!r}")
    return neck


class ReIDHead(nn.Module):
    """conv -> global average pool -> FC 512 -> BN -> classifier, with the embedding taken per ``neck``.

    ``conv`` is the backbone's last 1x1 convolution block (MobileNetV2's 1280-channel conv,
    ShuffleNetV2's conv5, CMSNet's conv5). ``neck`` (see :data:`NECKS`) says which tensor is the 512-D
    embedding that KSL-E, the triplets and retrieval see: the FC output before the BN (``"fc"``, the
    paper's figure), the BN output (``"bnneck"``) or ReLU(BN(FC)) (``"osnet"``).

    Train mode returns ``(logits [N, K], emb [N, 512])``; eval mode returns ``emb`` and skips the
    classifier (and, with ``neck="fc"``, the BN), so their cost never shows up at inference.
    """

    def __init__(self, conv: nn.Module, conv_channels: int, num_classes: int,
                 feature_dim: int = FEATURE_DIM, neck: Neck = "fc") -> None:
        super().__init__()
        self.neck = check_neck(neck)
        self.conv = conv
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(conv_channels, feature_dim)
        self.bn = nn.BatchNorm1d(feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def extra_repr(self) -> str:
        return f"neck={self.neck!r}"

    def forward(self, x: torch.Tensor) -> HeadOutput:
        x = self.pool(self.conv(x)).flatten(1)
        emb = self.fc(x)
        if self.neck == "fc":
            if not self.training:
                return emb
            return self.classifier(self.bn(emb)), emb
        emb = self.bn(emb)
        if self.neck == "osnet":
            emb = torch.relu(emb)
        if not self.training:
            return emb
        return self.classifier(emb), emb


def init_weights(module: nn.Module) -> nn.Module:
    """From-scratch initialisation of every layer inside ``module`` (in place; returns ``module``).

    Kaiming-normal (fan_out, ReLU gain) for convolutions, BN weight 1 / bias 0 with fresh running
    statistics, N(0, 0.01) for fully-connected layers. The same function re-initialises the copies
    that become isomorphic branches, so a branch starts from a new random draw and not from the main
    branch's (possibly trained) weights.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_running_stats()
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


class ReIDBackbone(nn.Module):
    """A Re-ID network as ``stem``, an ordered ``stages`` ModuleDict and a :class:`ReIDHead`.

    Train mode: ``model(x) -> (logits [N, num_classes], emb [N, 512])``; eval mode:
    ``model(x) -> emb [N, 512]``.

    Attributes: ``stem``, ``stages``, ``head``, ``default_taps`` (the stage names at whose *input*
    the paper attaches its isomorphic auxiliary branches), ``num_classes``, ``feature_dim``.
    """

    feature_dim: int = FEATURE_DIM

    def __init__(self, stem: nn.Module, stages: Sequence[tuple[str, nn.Module]], head: ReIDHead,
                 default_taps: Iterable[str], num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleDict(OrderedDict(stages))
        self.head = head
        self.default_taps = list(default_taps)
        self.num_classes = num_classes
        unknown = [t for t in self.default_taps if t not in self.stages]
        if unknown:  # a programming error in a backbone definition, not a user error
            raise AssertionError(f"default taps {unknown} are not stages {list(self.stages)}")
        self.init_weights(self)

    @staticmethod
    def init_weights(module: nn.Module) -> nn.Module:
        """Initialise ``module`` (this network or a copy of some of its parts) from scratch."""
        return init_weights(module)

    def forward(self, x: torch.Tensor) -> HeadOutput:
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)
