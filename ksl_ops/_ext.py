"""Loads the compiled extension (ksl_ops._C), which registers the torch.ops.ksl_ops operators."""
from __future__ import annotations

import torch

_LOAD_ERROR: Exception | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.ksl_ops.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _LOAD_ERROR = exc


def ops():
    """The ``torch.ops.ksl_ops`` namespace; a clear error if the extension was not built."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "ksl_ops: the compiled extension ksl_ops._C could not be loaded "
            f"({_LOAD_ERROR}). Build it with `pip install --no-build-isolation -e .` against the "
            "installed torch, or pass backend=\"reference\" to use the pure-PyTorch reference."
        ) from _LOAD_ERROR
    return torch.ops.ksl_ops


def available() -> bool:
    return _LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (independent of whether a GPU is present)."""
    if _LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ksl_ops::prob_consensus", "CUDA")
