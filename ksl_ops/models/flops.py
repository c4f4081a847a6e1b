"""Model size: parameter count and multiply-adds.

The KSL paper's "FLOPs" column (CMSNet 911.0 M, MobileNetV2 203.9 M, ShuffleNetV2 93.9 M at
256x128) is the Re-ID community's usual count: multiply-adds (MACs) of the convolution and
fully-connected weights for one image, with batch norm, activations, pooling and bias additions
not counted. :func:`count_flops` counts exactly that, with forward hooks, so it measures what the
module actually runs (in eval mode: the main branch up to the 512-D embedding, no classifier).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

__all__ = ["count_params", "count_flops"]


def count_params(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (each shared tensor counted once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters())


def _conv_macs(m: nn.modules.conv._ConvNd, out: torch.Tensor) -> int:
    # every output element is a dot product over (in_channels / groups) x kernel taps
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def count_flops(model: nn.Module, height: int = 256, width: int = 128) -> int:
    """Multiply-adds of one ``3 x height x width`` image through ``model`` in eval mode.

    Counts conv and linear layers only (see the module docstring). The model's train/eval state of
    every submodule is restored afterwards, and no gradient is recorded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    total = 0

    def hook(m: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += _linear_macs(m, out)
        elif isinstance(m, nn.modules.conv._ConvNd):  # the hook is registered on these two kinds only
            total += _conv_macs(m, out)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return int(total)
