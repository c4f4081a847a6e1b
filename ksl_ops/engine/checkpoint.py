"""Atomic, resumable training checkpoints that are data, not code.

A checkpoint holds everything needed to continue a run exactly where it stopped: model, optimizer
and LR-scheduler state, the epoch just finished, the run config, the metrics so far, and the RNG
states (Python, NumPy, torch CPU and CUDA) that decide augmentation, sampling and dropout.

It is written to a temporary file in the same directory, flushed and fsync'd, then moved over the
target with os.replace, which is atomic on POSIX and Windows: a crash or a kill mid-write leaves the
previous checkpoint intact, never a truncated file.

Checkpoints are shared, so reading one must never run code from it. Every load goes through
torch.load(weights_only=True), which rebuilds tensors and plain containers and refuses any other
pickled object; a checkpoint therefore holds only tensors, numbers, strings, lists and dicts (the
config as a dict, the RNG states as a tensor, lists and numbers), and save_checkpoint refuses
anything else. Every checkpoint carries its format version ("ksl_ops.checkpoint/<N>"); a newer one
than this code knows is refused with a message saying so.

Format 1 (ksl-ops 0.1.0) stored the NumPy RNG state as a NumPy uint32 array. Such files still load:
the four pickle names that array needs are allow-listed, but bound to the stand-ins below, which
can rebuild a 1-D uint32 array from raw bytes and nothing else -- not numpy's own functions, which
would let a file build arbitrary arrays. Resuming a format-1 run writes format 2 from then on.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = ["CheckpointError", "CheckpointNotFoundError", "FORMAT_VERSION", "atomic_save", "save_checkpoint",
           "read_checkpoint", "load_checkpoint", "load_model_state", "check_compatible", "checkpoint_num_classes",
           "describe_checkpoint", "rng_state", "set_rng_state"]

PathLike = Union[str, os.PathLike]

FORMAT = "ksl_ops.checkpoint"
FORMAT_VERSION = 2
_FORMAT_RE = re.compile(r"^ksl_ops\.checkpoint/(\d+)$")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A file that cannot be used as a ksl_ops checkpoint; the message names the file and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a FileNotFoundError, for callers that catch that)."""


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

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


_LEAVES = (torch.Tensor, bool, int, float, str, type(None))


def _plain(obj: Any, where: str) -> Any:
    """`obj` with NumPy scalars/arrays and paths turned into Python values; TypeError for anything else
    that torch.load(weights_only=True) would refuse to read back."""
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((k, _plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
        for k in out:
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot store key {k!r} at {where}: checkpoint keys are strings or integers")
        if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple, torch.Size):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if type(obj) is list else type(obj)(items)
    raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at {where}: a checkpoint "
                    f"holds only tensors, numbers, strings, lists and dicts, so that loading it runs no code")


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) RNG states, as a tensor, lists and numbers."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(v) for v in internal], gauss_next],
        "numpy": {"bit_generator": str(name), "key": [int(v) for v in key], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None, epoch: int,
                    config: Optional[Dict[str, Any]] = None, metrics: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a checkpoint after `epoch` (number of epochs completed) atomically to `path`.

    Everything is checked to be plain data first (TypeError otherwise), so no checkpoint is written
    that read_checkpoint would refuse.
    """
    state = {
        "format": f"{FORMAT}/{FORMAT_VERSION}",
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
    return atomic_save(_plain(state, "checkpoint"), path)


# ---------------------------------------------------------------------------------------------
# format 1: the NumPy RNG key array, and nothing else
# ---------------------------------------------------------------------------------------------

_NOT_V1_KEY = "not the numpy RNG key of a format-1 ksl_ops checkpoint"


class _V1Dtype:
    """Stands in for numpy.dtype while a file is read: only the uint32 of the MT19937 key."""

    def __init__(self, code, align=False, copy=True):
        if code != "u4":
            raise pickle.UnpicklingError(f"numpy dtype {code!r}: {_NOT_V1_KEY}")
        self.byteorder = "<"

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"a numpy dtype state: {_NOT_V1_KEY}")
        order = state[1]
        self.byteorder = order if order in ("<", ">") else ("<" if np.little_endian else ">")


class _V1UInt32Array:
    """Stands in for numpy.ndarray while a file is read: a 1-D uint32 array from raw bytes."""

    def __setstate__(self, state):
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw data)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError(f"a numpy array state: {_NOT_V1_KEY}")
        _, shape, dtype, _, raw = state
        if (not isinstance(dtype, _V1Dtype) or not isinstance(shape, tuple) or len(shape) != 1
                or not isinstance(raw, bytes) or len(raw) != 4 * int(shape[0])):
            raise pickle.UnpicklingError(f"a numpy array: {_NOT_V1_KEY}")
        self.values = np.frombuffer(raw, dtype=np.dtype(dtype.byteorder + "u4")).astype(np.uint32).tolist()


def _v1_reconstruct(subtype, shape, typecode):
    if subtype is not _V1UInt32Array or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"numpy _reconstruct: {_NOT_V1_KEY}")
    return _V1UInt32Array()


# Pickled by numpy 2 as numpy._core..., by numpy 1 as numpy.core...
_V1_GLOBALS = [
    (_v1_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_v1_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_V1UInt32Array, "numpy.ndarray"),
    (_V1Dtype, "numpy.dtype"),
]


def _allow_format1():
    # torch.serialization.safe_globals (torch >= 2.5) scopes the allow-list to this one load. On an
    # older torch format-1 files are refused like any other file holding NumPy objects.
    scoped = getattr(torch.serialization, "safe_globals", None)
    return scoped(_V1_GLOBALS) if scoped is not None else contextlib.nullcontext()


def _upgrade_from_v1(state: Dict[str, Any]) -> Dict[str, Any]:
    """Format 1 -> 2: the RNG states become lists (the only difference)."""
    rng = state.get("rng")
    if isinstance(rng, dict):
        rng = dict(rng)
        py, npy = rng.get("python"), rng.get("numpy")
        if isinstance(py, tuple) and len(py) == 3:
            rng["python"] = [py[0], list(py[1]), py[2]]
        if isinstance(npy, tuple) and len(npy) == 5 and isinstance(npy[1], (_V1UInt32Array, np.ndarray)):
            # (an ndarray if the caller had allow-listed numpy's own globals before us)
            key = npy[1].values if isinstance(npy[1], _V1UInt32Array) else npy[1].tolist()
            rng["numpy"] = {"bit_generator": npy[0], "key": key, "pos": npy[2], "has_gauss": npy[3],
                            "cached_gaussian": npy[4]}
        state = dict(state, rng=rng)
    state["format"] = f"{FORMAT}/{FORMAT_VERSION}"
    state["upgraded_from"] = f"{FORMAT}/1"
    return state


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def _check_file(path: Path) -> int:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        inside = path / "last.ckpt"
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise CheckpointError(f"{path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file, so not a checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: an interrupted copy or download?")
    return size


def _torch_reason(exc: Exception) -> str:
    """The line of a torch.load error that says what went wrong, without torch's generic advice."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and not ln.strip().startswith("Check the documentation")]
    reason = lines[-1].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {reason[:200]}" if reason else type(exc).__name__


def _load_error(path: Path, size: int, exc: Exception) -> CheckpointError:
    msg = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found or _NOT_V1_KEY in msg or "unrecognized function" in msg or "Can only create new object" in msg:
            what = f" ({found.group(1)})" if found else " (numpy objects)" if _NOT_V1_KEY in msg else ""
            return CheckpointError(
                f"{path} holds pickled code or objects{what} that a ksl_ops checkpoint never contains; it was "
                f"not loaded and nothing in it was run. Open it by other means only if you know who made it "
                f"and what it runs")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return CheckpointError(f"cannot read {path}: {e.strerror or e}")
    if head == _ZIP_MAGIC:
        return CheckpointError(f"{path} is a damaged torch file ({size} bytes; truncated or corrupt?): "
                               f"{_torch_reason(exc)}")
    return CheckpointError(f"{path} is not a torch checkpoint ({size} bytes that torch.load cannot read: "
                           f"{_torch_reason(exc)})")


def _check_plain(obj: Any, path: Path, where: str = "checkpoint") -> None:
    if isinstance(obj, _LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, path, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, path, f"{where}[{i}]")
    else:
        # Only the format-1 stand-ins get here: a NumPy array outside the one place format 1 had one.
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: {where} holds a NumPy object, "
                              f"which a ksl_ops checkpoint never has there")


def read_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Read and check a checkpoint without running any code from it; returns its dict (format 2).

    Raises CheckpointError (a ValueError) naming the file and the problem for a missing file, a
    directory, an empty, truncated or foreign file, a torch file that is not a ksl_ops checkpoint,
    a file holding pickled objects other than data, and a format newer than this code reads.
    """
    path = Path(path)
    size = _check_file(path)
    try:
        with _allow_format1():
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # whatever the bytes make torch raise, the user gets one clear message
        raise _load_error(path, size, exc) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is a torch file holding a {type(state).__name__}, not a ksl_ops checkpoint")
    fmt = state.get("format")
    found = _FORMAT_RE.match(fmt) if isinstance(fmt, str) else None
    if found is None:
        keys = ", ".join(repr(k) for k in list(state)[:5]) + (", ..." if len(state) > 5 else "")
        bare = state and all(isinstance(v, torch.Tensor) for v in state.values())
        what = "a bare state_dict" if bare else (f"format {fmt!r}" if fmt is not None else f"keys {keys}")
        raise CheckpointError(f"{path} is a torch file but not a ksl_ops checkpoint ({what}); `ksl eval` and "
                              f"`--resume` take the last.ckpt that `ksl train` writes")
    version = int(found.group(1))
    if version > FORMAT_VERSION:
        from .._version import __version__

        raise CheckpointError(f"{path} is a ksl_ops checkpoint of format version {version}, newer than this "
                              f"ksl-ops ({__version__}) reads (up to {FORMAT_VERSION}); upgrade ksl-ops to load it")
    if version < 1:
        raise CheckpointError(f"{path} claims ksl_ops checkpoint format version {version}, which never existed")
    if version == 1:
        state = _upgrade_from_v1(state)
    for key, kind, name in (("epoch", int, "an integer"), ("model", dict, "a dict"), ("config", dict, "a dict")):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path} is an incomplete ksl_ops checkpoint: '{key}' is missing or not {name}")
    bad = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: model entry {bad[0]!r} is not a tensor")
    _check_plain(state, path)
    return state


def checkpoint_num_classes(state: Dict[str, Any]) -> Optional[int]:
    """The number of training identities of a checkpoint (its classifier size), None if unknown."""
    if isinstance(state.get("num_classes"), int):
        return state["num_classes"]
    keys = [k for k in state["model"] if k.endswith("classifier.weight")]
    return int(state["model"][min(keys, key=len)].shape[0]) if keys else None


def check_compatible(state: Dict[str, Any], path: PathLike, backbone: Optional[str] = None,
                     num_classes: Optional[int] = None) -> None:
    """CheckpointError if the checkpoint is of another backbone or number of classes than asked."""
    got = state["config"].get("backbone")
    if backbone is not None and got is not None and got != backbone:
        raise CheckpointError(f"{path} is a {got} checkpoint, not {backbone}")
    n = checkpoint_num_classes(state)
    if num_classes is not None and n is not None and n != num_classes:
        raise CheckpointError(f"{path} was trained on {n} classes (identities), not the {num_classes} asked for")


def load_model_state(model: torch.nn.Module, state: Dict[str, Any], path: PathLike) -> None:
    """model.load_state_dict(state["model"]), with a CheckpointError saying what does not fit."""
    have, want = state["model"], model.state_dict()
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} {list(have[k].shape)} vs {list(v.shape)}" for k, v in want.items()
              if k in have and have[k].shape != v.shape]
    problems: List[str] = []
    for what, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            problems.append(f"{len(items)} {what} entries (e.g. {', '.join(items[:2])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, checkpoint vs model (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise CheckpointError(f"{path} does not fit this {type(model).__name__}: {'; '.join(problems)}")
    try:
        model.load_state_dict(have)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this {type(model).__name__}: {exc}") from exc


def load_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None, optimizer=None, scheduler=None,
                    map_location="cpu", restore_rng: bool = False, backbone: Optional[str] = None,
                    num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Read a checkpoint; load its states into the given model/optimizer/scheduler; return the dict.

    With backbone / num_classes a checkpoint of another backbone or classifier size is refused.
    With restore_rng=True the RNG states are restored as well, so that a resumed run draws the same
    random numbers the uninterrupted run would have.
    """
    state = read_checkpoint(path, map_location=map_location)
    check_compatible(state, path, backbone, num_classes)
    if optimizer is not None and state.get("optimizer") is None:
        raise CheckpointError(f"{path} has no optimizer state to resume from")
    if model is not None:
        load_model_state(model, state, path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer: {exc}") from exc
    # A hand-edited file can be plain data and still not be a state these accept.
    if scheduler is not None and state.get("scheduler") is not None:
        try:
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: its scheduler state cannot be restored: {exc!r}") from exc
    if restore_rng and state.get("rng") is not None:
        try:
            set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: its RNG state cannot be restored: {exc!r}") from exc
    return state


def describe_checkpoint(state: Dict[str, Any]) -> str:
    """One line on what a checkpoint is: backbone, losses, classes, epoch, input size, dataset."""
    cfg = state["config"]
    epochs = f"/{cfg['epochs']}" if "epochs" in cfg else ""
    parts = [f"{cfg.get('backbone', '?')}", f"losses {cfg.get('losses', '?')}"]
    n = checkpoint_num_classes(state)
    if n is not None:
        parts.append(f"{n} classes")
    parts.append(f"epoch {state['epoch']}{epochs}")
    if "height" in cfg and "width" in cfg:
        parts.append(f"input {cfg['height']}x{cfg['width']}")
    if "dataset" in cfg:
        parts.append(f"trained on {cfg['dataset']}")
    fmt = state.get("upgraded_from", state["format"]).rsplit("/", 1)[-1]
    note = ", upgraded on load" if "upgraded_from" in state else ""
    return f"{', '.join(parts)} (format {fmt}{note})"
