"""Atomic, resumable training checkpoints.

A checkpoint holds everything needed to continue a run exactly where it stopped: model, optimizer
and LR-scheduler state, the epoch just finished, the run config, the metrics so far, and the RNG
states (Python, NumPy, torch CPU and CUDA) that decide augmentation, sampling and dropout.

It is written to a temporary file in the same directory, flushed and fsync'd, then moved over the
target with os.replace, which is atomic on POSIX and Windows: a crash or a kill mid-write leaves the
previous checkpoint intact, never a truncated file.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save `obj` to `path` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temp file, and keep whatever checkpoint was there before.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None, epoch: int,
                    config: Optional[Dict[str, Any]] = None, metrics: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a checkpoint after `epoch` (number of epochs completed) atomically to `path`."""
    state = {
        "format": "ksl_ops.checkpoint/1",
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": dict(config or {}),
        "metrics": metrics,
        "rng": rng_state(),
    }
    if extra:
        state.update(extra)
    return atomic_save(state, path)


def load_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None, optimizer=None, scheduler=None,
                    map_location="cpu", restore_rng: bool = False) -> Dict[str, Any]:
    """Read a checkpoint; load its states into the given model/optimizer/scheduler; return the dict.

    With restore_rng=True the RNG states are restored as well, so that a resumed run draws the same
    random numbers the uninterrupted run would have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # The checkpoint holds RNG states (NumPy arrays, tuples) and the config, not only tensors.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a ksl_ops checkpoint (no 'model' entry)")
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise ValueError(f"{path} has no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    return state
