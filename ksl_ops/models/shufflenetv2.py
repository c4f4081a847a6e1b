"""ShuffleNetV2 x1.0 (Ma et al., ECCV 2018) as a Re-ID backbone, written from the paper's Table 5.

stem (conv 3x3 s2, 24 ch + maxpool 3x3 s2) -> stage2 (116 ch, 4 units) -> stage3 (232 ch, 8 units)
-> stage4 (464 ch, 4 units) -> head (conv5 1x1 1024 -> GAP -> FC 512 -> BN -> classifier).
Output stride 32. KSL taps: the inputs of ``stage3`` and ``stage4``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .head import ConvBNAct, Neck, ReIDBackbone, ReIDHead, _check_num_classes

__all__ = ["ShuffleNetV2", "ShuffleUnit", "channel_shuffle"]

_STAGE_REPEATS = (4, 8, 4)
_STAGE_CHANNELS = (24, 116, 232, 464, 1024)  # stem, stage2..4, conv5 (x1.0)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across ``groups`` so the two branches exchange information next unit."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit.

    stride 1: split channels in half, keep one half as is, transform the other
    (1x1 -> depthwise 3x3 -> 1x1), concatenate, shuffle.
    stride 2: both halves see the whole input; the shortcut branch is depthwise 3x3 s2 -> 1x1, the
    main branch as above with a strided depthwise conv; channels double by the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 ShuffleUnit keeps the channel count")
        self.stride = stride
        half = out_channels // 2
        main_in = in_channels if stride == 2 else in_channels // 2
        self.main = nn.Sequential(
            ConvBNAct(main_in, half, 1),
            ConvBNAct(half, half, 3, stride=stride, groups=half, act=None),
            ConvBNAct(half, half, 1),
        )
        self.shortcut: Optional[nn.Sequential]
        if stride == 2:
            self.shortcut = nn.Sequential(
                ConvBNAct(in_channels, in_channels, 3, stride=2, groups=in_channels, act=None),
                ConvBNAct(in_channels, half, 1),
            )
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            keep, x2 = x.chunk(2, dim=1)
            out = torch.cat((keep, self.main(x2)), dim=1)
        else:
            out = torch.cat((self.shortcut(x), self.main(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(ReIDBackbone):
    """ShuffleNetV2 x1.0 with the Re-ID head. Default taps: ``["stage3", "stage4"]``."""

    def __init__(self, num_classes: int = 751, neck: Neck = "fc") -> None:
        num_classes = _check_num_classes(num_classes)
        c = _STAGE_CHANNELS
        stem = nn.Sequential(
            ConvBNAct(3, c[0], 3, stride=2),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages = []
        in_ch = c[0]
        for k, (repeats, out_ch) in enumerate(zip(_STAGE_REPEATS, c[1:4]), start=2):
            units = [ShuffleUnit(in_ch, out_ch, 2)]
            units += [ShuffleUnit(out_ch, out_ch, 1) for _ in range(repeats - 1)]
            stages.append((f"stage{k}", nn.Sequential(*units)))
            in_ch = out_ch
        head = ReIDHead(ConvBNAct(in_ch, c[4], 1), c[4], num_classes, neck=neck)
        super().__init__(stem, stages, head, ["stage3", "stage4"], num_classes)
