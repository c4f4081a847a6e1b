"""CMSNet, the contextual multi-scale Re-ID network (Fan et al., "Contextual Multi-Scale Feature
Learning for Person Re-Identification", ACM MM 2020) -- **a reconstruction, not the authors' code**.

No implementation of CMSNet is public. This module rebuilds it from the paper's abstract, which
names three ingredients of the building block, placed on an OSNet-like macro layout (the layout the
KSL paper's Figure 4 draws: conv1 ... conv5) and sized to the published budget (about 2.1 M
parameters without the classifier, about 0.9 G multiply-adds at 256x128):

1. *Forward hierarchical connection group, stepwise inter-scale fusion.* After a 1x1 reduction to
   ``mid = out / 4`` channels the block computes S = 4 scale features with "lite 3x3" layers
   (pointwise 1x1 then depthwise 3x3, as in OSNet)::

       f_1 = L_1(x),        f_t = L_t(x + f_{t-1})   (t = 2..S)

   Each step fuses the input with the previous (smaller) scale and grows the receptive field by 2,
   so f_t mixes the scales 3, 5, ..., 2t+1 (the "common" multi-scale representation).
2. *Backward hierarchical connection group, leap-frogging inter-scale fusion.* It mirrors the
   forward group (S more lite 3x3 layers B_t), going back from the largest scale; each scale fuses
   the context of the scale two steps larger, leaping over its neighbour, which already reached it
   through the forward chain::

       c_S = B_S(f_S),      c_t = B_t(f_t + c_{min(t+2, S)})   (t = S-1..1)

   so the small scales see large-scale context (the "contextual" multi-scale representation).
3. *Channel-wise scale selection.* A squeeze-and-select gate computes, per channel, a softmax over
   the S scales from the globally pooled sum of the c_t, and the block output is the weighted sum
   ``y = sum_t a_t * c_t``, so each channel picks its scales per input image.

The block ends with a linear 1x1 expansion to ``out`` channels and a residual connection
(projected when the width changes).

Size, measured with :mod:`ksl_ops.models.flops`: 2,106,848 parameters without the classifier
(1,843,168 without FC-512 and its BN as well) and 911.0 M multiply-adds at 256x128 (conv and FC
weights, eval mode).
The published figures are 2.1 M and 911.0 M; the unknowns (four scales, mid = out/4, a backward
group as deep as the forward one) were chosen to meet that budget, so the match says the sizes
agree, not that the layers are the authors'. Macro layout (input 256x128):

=========  ===========================================  ======  ========
stage      layers                                       output  channels
=========  ===========================================  ======  ========
stem       conv1 7x7 s2 + maxpool 3x3 s2                64x32      64
conv2      2 CMS blocks, transition (1x1 conv, avgpool)  32x16     256
conv3      2 CMS blocks, transition (1x1 conv, avgpool)  16x8      384
conv4      2 CMS blocks                                  16x8      512
head       conv5 1x1 -> GAP -> FC 512 -> BN -> classifier           512
=========  ===========================================  ======  ========

KSL taps (paper Figure 4): the inputs of ``conv3`` and ``conv4``.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .head import ConvBNAct, Neck, ReIDBackbone, ReIDHead, _check_num_classes

__all__ = ["CMSNet", "CMSBlock", "ScaleSelection"]


class LiteConv3x3(nn.Module):
    """Pointwise 1x1 (linear) -> depthwise 3x3 -> BN -> ReLU: a 3x3 receptive field for about
    1/9 of the cost of a dense 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.depthwise(self.pointwise(x))))


class ScaleSelection(nn.Module):
    """Channel-wise soft selection among S scale features (softmax over scales, per channel)."""

    def __init__(self, channels: int, num_scales: int, reduction: int = 4, min_hidden: int = 16):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.num_scales = num_scales
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.select = nn.Conv2d(hidden, channels * num_scales, 1)

    def forward(self, scales: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(scales, dim=1)  # [N, S, C, H, W]
        n, s, c = stacked.shape[:3]
        weights = self.select(self.squeeze(stacked.sum(dim=1)))  # [N, S*C, 1, 1]
        weights = weights.view(n, s, c, 1, 1).softmax(dim=1)
        return (stacked * weights).sum(dim=1)


class CMSBlock(nn.Module):
    """The CMSNet building block (reconstruction; see the module docstring for the equations)."""

    def __init__(self, in_channels: int, out_channels: int, num_scales: int = 4, reduction: int = 4):
        super().__init__()
        if num_scales < 2:
            raise ValueError(f"num_scales must be >= 2, got {num_scales}")
        mid = out_channels // reduction
        self.num_scales = num_scales
        self.reduce = ConvBNAct(in_channels, mid, 1)
        self.forward_group = nn.ModuleList(LiteConv3x3(mid) for _ in range(num_scales))
        # backward_group[t] fuses scale t (0-based) with its leap-frog context, t = 0..S-1
        self.backward_group = nn.ModuleList(LiteConv3x3(mid) for _ in range(num_scales))
        self.selection = ScaleSelection(mid, num_scales)
        self.expand = ConvBNAct(mid, out_channels, 1, act=None)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else ConvBNAct(in_channels, out_channels, 1, act=None))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        x = self.reduce(x)
        # forward hierarchical connections: stepwise fusion, small scale -> large scale
        f = [self.forward_group[0](x)]
        for layer in self.forward_group[1:]:
            f.append(layer(x + f[-1]))
        # backward hierarchical connections: leap-frog fusion, large scale -> small scale
        last = self.num_scales - 1
        c = [None] * self.num_scales
        c[last] = self.backward_group[last](f[last])
        for t in range(last - 1, -1, -1):
            c[t] = self.backward_group[t](f[t] + c[min(t + 2, last)])
        y = self.selection(c)
        return self.act(self.expand(y) + identity)


class _Transition(nn.Sequential):
    """1x1 conv then 2x2 average pool: halves the resolution between stages (as in OSNet)."""

    def __init__(self, channels: int):
        super().__init__(ConvBNAct(channels, channels, 1), nn.AvgPool2d(2, stride=2))


def _stage(in_channels: int, out_channels: int, blocks: int, transition: bool) -> nn.Sequential:
    layers: List[nn.Module] = [CMSBlock(in_channels, out_channels)]
    layers += [CMSBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    if transition:
        layers.append(_Transition(out_channels))
    return nn.Sequential(*layers)


class CMSNet(ReIDBackbone):
    """CMSNet x1.0 -- a reconstruction from the paper's description, **not the authors' code**.

    See the module docstring for the block equations and the layout. Default taps:
    ``["conv3", "conv4"]`` (KSL paper, Figure 4).
    """

    channels = (64, 256, 384, 512)
    blocks = (2, 2, 2)

    def __init__(self, num_classes: int = 751, neck: Neck = "fc") -> None:
        num_classes = _check_num_classes(num_classes)
        c = self.channels
        stem = nn.Sequential(
            ConvBNAct(3, c[0], 7, stride=2),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = [
            ("conv2", _stage(c[0], c[1], self.blocks[0], transition=True)),
            ("conv3", _stage(c[1], c[2], self.blocks[1], transition=True)),
            ("conv4", _stage(c[2], c[3], self.blocks[2], transition=False)),
        ]
        head = ReIDHead(ConvBNAct(c[3], c[3], 1), c[3], num_classes, neck=neck)
        super().__init__(stem, stages, head, ["conv3", "conv4"], num_classes)
