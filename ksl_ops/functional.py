"""The three KSL loss ops as differentiable functions.

Each public function validates its inputs (DESIGN.md §3.4), then runs either the fused operator
(torch.ops.ksl_ops.*, through a torch.autograd.Function) or, with backend="reference", the
pure-PyTorch reference in ksl_ops.reference. Fake (meta) kernels and autograd formulas are
registered here with torch.library so that opcheck and torch.compile(fullgraph=True) work.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from . import _ext

TensorOrBranches = Union[torch.Tensor, Sequence[torch.Tensor]]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_BACKENDS = ("fused", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reduction_code(reduction: str) -> int:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _stack_branches(x: TensorOrBranches, name: str, shape: str) -> torch.Tensor:
    """[B, N, D] from a stacked tensor or a sequence of B tensors [N, D]; checks B, N, dtype.

    `shape` names the expected layout in error messages, e.g. "[B, N, K]".
    """
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name} must be a {shape} tensor or a list of B {shape.replace('B, ', '')} tensors, "
                             f"got a tensor of shape {tuple(x.shape)}")
        stacked = x
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(t, torch.Tensor) for t in x):
            raise TypeError(f"{name} must be a tensor or a list of tensors, got a list containing "
                            f"{sorted({type(t).__name__ for t in x if not isinstance(t, torch.Tensor)})}")
        if len(x) < 2:
            raise ValueError(f"{name} needs at least 2 branches (B >= 2), got {len(x)}")
        first = x[0]
        for b, t in enumerate(x):
            if t.dim() != 2:
                raise ValueError(f"{name}[{b}] must be {shape.replace('B, ', '')}, got shape {tuple(t.shape)}")
            if t.shape != first.shape:
                raise ValueError(f"{name}: all branches must have the same shape; {name}[0] is "
                                 f"{tuple(first.shape)} but {name}[{b}] is {tuple(t.shape)}")
            if t.dtype != first.dtype:
                raise TypeError(f"{name}: all branches must have the same dtype; {name}[0] is "
                                f"{first.dtype} but {name}[{b}] is {t.dtype}")
            if t.device != first.device:
                raise ValueError(f"{name}: all branches must be on the same device; {name}[0] is on "
                                 f"{first.device} but {name}[{b}] is on {t.device}")
        stacked = torch.stack(list(x))
    else:
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")

    if stacked.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {stacked.dtype}")
    if stacked.size(0) < 2:
        raise ValueError(f"{name} needs at least 2 branches (B >= 2), got B={stacked.size(0)}")
    if stacked.size(1) == 0:
        raise ValueError(f"{name} has no samples (N = 0), shape {tuple(stacked.shape)}")
    return stacked


# ---------------------------------------------------------------------------------------------
# KSL-P: prob_consensus
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# KSL-E: embedding_consensus
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Triplets within and across branches: branch_triplet
# ---------------------------------------------------------------------------------------------
