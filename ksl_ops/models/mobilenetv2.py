"""MobileNetV2 x1.0 (Sandler et al., CVPR 2018) as a Re-ID backbone, written from the paper's table.

Layout (input 256x128 -> output stride 32):

====================  ===  =====  ==  ======
stage                  t     c    n    s
====================  ===  =====  ==  ======
stem: conv 3x3         -     32   1    2
bottleneck1            1     16   1    1
bottleneck2            6     24   2    2
bottleneck3            6     32   3    2
bottleneck4            6     64   4    2
bottleneck5            6     96   3    1
bottleneck6            6    160   3    2
bottleneck7            6    320   1    1
head conv 1x1          -   1280   1    1
====================  ===  =====  ==  ======

Each "bottleneck k" stage is one bottleneck *sequence* (the paper's table row), so the KSL taps
"inputs of the 4th and 6th bottleneck" are the stage names ``bottleneck4`` and ``bottleneck6``.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import ConvBNAct, Neck, ReIDBackbone, ReIDHead, _check_num_classes

__all__ = ["MobileNetV2", "InvertedResidual"]

# (expansion t, output channels c, repeats n, first stride s), MobileNetV2 paper, Table 2.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> linear project 1x1, residual when shapes match.

    The projection has no activation ("linear bottleneck"): a ReLU in the narrow space would destroy
    information the residual stream carries.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6),
            ConvBNAct(hidden, out_channels, 1, act=None),
        ]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_residual else y


class MobileNetV2(ReIDBackbone):
    """MobileNetV2 x1.0 with the Re-ID head (1x1 conv 1280 -> GAP -> FC 512 -> BN -> classifier).

    Default taps: ``["bottleneck4", "bottleneck6"]`` (KSL paper §4.3).
    """

    def __init__(self, num_classes: int = 751, neck: Neck = "fc") -> None:
        num_classes = _check_num_classes(num_classes)
        stem = ConvBNAct(3, 32, 3, stride=2, act=nn.ReLU6)
        stages = []
        in_ch = 32
        for k, (t, c, n, s) in enumerate(_SETTINGS, start=1):
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
            stages.append((f"bottleneck{k}", nn.Sequential(*blocks)))
        head = ReIDHead(ConvBNAct(in_ch, 1280, 1, act=nn.ReLU6), 1280, num_classes, neck=neck)
        super().__init__(stem, stages, head, ["bottleneck4", "bottleneck6"], num_classes)
