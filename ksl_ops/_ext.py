"""Loads the compiled extension (ksl_ops._C), which registers the torch.ops.ksl_ops operators.

The library links one torch's C++ ABI, so it is loaded only under the torch it was compiled against
(``_build_info.py``, written by the build); under any other torch the ops raise an error that says
so and how to rebuild, instead of an undefined-symbol error or a crash.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

REBUILD_HINT = ("Rebuild it against the installed torch with `pip install --no-build-isolation "
                "--force-reinstall --no-deps .` (or `-e .`) from the ksl-ops source, or pass "
                "backend=\"reference\" to use the pure-PyTorch reference.")

_LOAD_ERROR: Exception | None = None

_build_info: ModuleType | None
try:
    _build_info = importlib.import_module("._build_info", __package__)
except ImportError:  # a source tree that was never built
    _build_info = None

if _build_info is not None and _build_info.TORCH_VERSION != torch.__version__:
    _LOAD_ERROR = ImportError(
        f"ksl_ops._C was compiled against torch {_build_info.TORCH_VERSION}, but torch {torch.__version__} "
        "is installed")
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ksl_ops.*)
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        _LOAD_ERROR = exc


def ops() -> torch._ops._OpNamespace:
    """The ``torch.ops.ksl_ops`` namespace; a clear error if the extension was not built."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            f"ksl_ops: the compiled extension ksl_ops._C could not be loaded ({_LOAD_ERROR}). {REBUILD_HINT}"
        ) from _LOAD_ERROR
    return torch.ops.ksl_ops


def available() -> bool:
    return _LOAD_ERROR is None


def load_error() -> Exception | None:
    """Why the compiled extension is not loaded (None when it is)."""
    return _LOAD_ERROR


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled in (independent of whether a GPU is present)."""
    if _LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ksl_ops::prob_consensus", "CUDA")
