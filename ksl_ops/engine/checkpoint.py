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

import math
import os
import pickle
import random
import re
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
from torch.optim import Optimizer

__all__ = ["CheckpointError", "CheckpointNotFoundError", "FORMAT_VERSION", "atomic_save", "remove_stale_temp_files",
           "save_checkpoint", "read_checkpoint", "load_checkpoint", "load_model_state", "check_compatible",
           "checkpoint_num_classes", "describe_checkpoint", "rng_state", "set_rng_state"]

PathLike = Union[str, os.PathLike]

# Where torch.load puts tensors: a device (or its name), or a function of (storage, location).
MapLocation = Union[str, torch.device, Callable[..., Any], None]


class Stateful(Protocol):
    """What a checkpoint saves and restores, e.g. an LR scheduler: a state_dict and load_state_dict."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None: ...


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

def _temp_name(target: Path) -> str:
    return f".{target.name}.{secrets.token_hex(4)}.tmp"


def _is_our_temp(name: str, target_name: str) -> bool:
    prefix = f".{target_name}."
    return name.startswith(prefix) and name.endswith(".tmp") and len(name) > len(prefix) + len(".tmp")


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save `obj` to `path` atomically (temp file in the same folder + os.replace).

    The file gets the mode of any new file (0666 less the umask), not the 0600 of a private temp file.
    A process killed mid-write leaves its temp file (".<name>.<random>.tmp") behind;
    remove_stale_temp_files clears them when the next run starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
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


def remove_stale_temp_files(path: PathLike) -> List[Path]:
    """Delete the temp files that atomic_save(..., path) leaves when its process is killed mid-write
    (".<name>.<random>.tmp" next to `path`, and only those); returns what was removed. Call it when a
    run starts, before anything writes `path`: a temp file is then never a write in progress of this run.
    """
    path = Path(path)
    removed: List[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if _is_our_temp(name, path.name):
            p = path.parent / name
            try:
                if p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


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


def save_checkpoint(path: PathLike, *, model: torch.nn.Module, optimizer: Optional[Optimizer] = None,
                    scheduler: Optional[Stateful] = None, epoch: int,
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

    def __init__(self, code: object, align: bool = False, copy: bool = True) -> None:
        if code != "u4":
            raise pickle.UnpicklingError(f"numpy dtype {code!r}: {_NOT_V1_KEY}")
        self.byteorder = "<"

    def __setstate__(self, state: object) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"a numpy dtype state: {_NOT_V1_KEY}")
        order = state[1]
        self.byteorder = order if order in ("<", ">") else ("<" if np.little_endian else ">")


class _V1UInt32Array:
    """Stands in for numpy.ndarray while a file is read: a 1-D uint32 array from raw bytes."""

    def __setstate__(self, state: object) -> None:
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw data)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError(f"a numpy array state: {_NOT_V1_KEY}")
        _, shape, dtype, _, raw = state
        if (not isinstance(dtype, _V1Dtype) or not isinstance(shape, tuple) or len(shape) != 1
                or not isinstance(raw, bytes) or len(raw) != 4 * int(shape[0])):
            raise pickle.UnpicklingError(f"a numpy array: {_NOT_V1_KEY}")
        self.values = np.frombuffer(raw, dtype=np.dtype(dtype.byteorder + "u4")).astype(np.uint32).tolist()


def _v1_reconstruct(subtype: object, shape: Sequence[int], typecode: object) -> _V1UInt32Array:
    if subtype is not _V1UInt32Array or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"numpy _reconstruct: {_NOT_V1_KEY}")
    return _V1UInt32Array()


# Pickled by numpy 2 as numpy._core..., by numpy 1 as numpy.core...
_V1_GLOBALS: List[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]] = [
    (_v1_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_v1_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_V1UInt32Array, "numpy.ndarray"),
    (_V1Dtype, "numpy.dtype"),
]


def _allow_format1() -> ContextManager[None]:
    # torch.serialization.safe_globals scopes the allow-list to this one load.
    return torch.serialization.safe_globals(_V1_GLOBALS)


def _upgrade_from_v1(state: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Format 1 -> 2: the RNG states become lists (the only difference)."""
    rng = state.get("rng")
    if isinstance(rng, dict):
        rng = dict(rng)
        py, npy = rng.get("python"), rng.get("numpy")
        if isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], (list, tuple)):
            rng["python"] = [py[0], list(py[1]), py[2]]  # (anything else is refused by _check_rng on resume)
        if isinstance(npy, tuple) and len(npy) == 5 and isinstance(npy[1], (_V1UInt32Array, np.ndarray)):
            # (an ndarray if the caller had allow-listed numpy's own globals before us)
            if isinstance(npy[1], _V1UInt32Array) and not hasattr(npy[1], "values"):
                # _reconstruct without the BUILD that fills it: an array with no data
                raise CheckpointError(f"{path}: its RNG state cannot be restored: the format-1 NumPy key array "
                                      f"has no data")
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


#: How deep lists and dicts may nest in a checkpoint. What save_checkpoint writes nests about 6 deep
#: (state -> metrics -> history -> record -> eval -> value); a hand-made file nested thousands deep
#: would otherwise exhaust Python's recursion limit wherever it is walked.
MAX_DEPTH = 64


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a message stays one readable line whatever a file holds."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit - 20]}... ({len(r)} characters)"


def _where(parent: str, key: Any) -> str:
    return f"{parent}[{_short(key, 60)}]" if len(parent) < 200 else parent


def _check_plain(obj: Any, path: Path, where: str = "checkpoint") -> None:
    """CheckpointError unless `obj` is plain data: tensors (whole, on a real device), numbers, strings,
    lists, tuples and dicts, nested at most MAX_DEPTH deep. Walked with a stack, not recursion."""
    stack = [(obj, where, 0)]
    while stack:
        item, at, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            _check_tensor(item, path, at)
            continue
        if isinstance(item, _LEAVES):
            continue
        if isinstance(item, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: {at} nests lists or dicts more "
                                      f"than {MAX_DEPTH} deep, which a ksl_ops checkpoint never does")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, _where(at, k), depth + 1) for k, v in pairs)
            continue
        # Only the format-1 stand-ins get here: a NumPy array outside the one place format 1 had one.
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: {at} holds a NumPy object, "
                              f"which a ksl_ops checkpoint never has there")


def _check_tensor(t: torch.Tensor, path: Path, where: str) -> None:
    if t.device.type == "meta":
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: {where} is a tensor without data "
                              f"(device 'meta')")
    # torch.save writes a tensor as a storage plus sizes and strides; strides that revisit elements
    # (an expanded tensor) let a few bytes declare a huge tensor. A saved state never has them.
    room = t.untyped_storage().nbytes() // max(t.element_size(), 1) - t.storage_offset()
    if t.numel() > room:
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: {where} is an overlapping view of "
                              f"{list(t.shape)} over {room} stored elements (an expanded tensor), which saving "
                              f"a model never writes")


def _check_rng(rng: Any, path: PathLike) -> None:
    """CheckpointError unless `rng` is an RNG state that set_rng_state can restore, tried on scratch
    generators first, so that a bad state is refused whole and no generator is left half-restored."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its RNG state cannot be restored: {what}")

    if not isinstance(rng, dict):
        raise bad(f"'rng' is a {type(rng).__name__}, not a dict")
    for key in ("python", "numpy", "torch"):
        if key not in rng:
            raise bad(repr(KeyError(key)))
    try:
        version, internal, gauss_next = rng["python"]
        if not (isinstance(internal, (list, tuple)) and len(internal) == 625
                and all(type(v) is int and 0 <= v < 2 ** 32 for v in internal)):
            raise ValueError("the Python state must hold 625 integers in [0, 2**32)")
        if not (gauss_next is None or isinstance(gauss_next, float)):
            raise TypeError(f"the Python gauss_next must be None or a float, not {type(gauss_next).__name__}")
        random.Random().setstate((int(version), tuple(internal), gauss_next))
        n = rng["numpy"]
        if not isinstance(n, dict):
            raise TypeError(f"the NumPy state must be a dict, not {type(n).__name__}")
        key = n["key"]
        if not (isinstance(key, (list, tuple)) and len(key) == 624
                and all(type(v) is int and 0 <= v < 2 ** 32 for v in key)):
            raise ValueError("the NumPy key must hold 624 integers in [0, 2**32)")
        for name, kind in (("bit_generator", str), ("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
            if not isinstance(n[name], kind) or isinstance(n[name], bool):
                raise TypeError(f"the NumPy {name} must be a {kind.__name__}, not {type(n[name]).__name__}")
        np.random.RandomState().set_state((n["bit_generator"], np.asarray(key, dtype=np.uint32), n["pos"],
                                           n["has_gauss"], n["cached_gaussian"]))
        states = [rng["torch"]] + list(rng.get("cuda") or [])
        for t in states:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
                raise TypeError("a torch RNG state must be a 1-D uint8 tensor")
        torch.Generator().set_state(rng["torch"].cpu())
    except Exception as exc:  # whatever a malformed state makes these raise, one message
        raise bad(repr(exc)[:300]) from None


def _classifier_keys(model_state: Dict[str, Any]) -> List[str]:
    return [k for k in model_state if isinstance(k, str) and k.endswith("classifier.weight")]


def _check_classifier(state: Dict[str, Any], path: Path) -> None:
    """Every classifier weight is a [classes, features] matrix with classes >= 1, and a num_classes
    entry, if any, is a positive integer that agrees with it."""
    rows = None
    for k in _classifier_keys(state["model"]):
        w = state["model"][k]
        if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: model entry {_short(k)} has shape "
                                  f"{list(w.shape)}, not [classes, features]")
        if rows is None or len(k) < len(rows[0]):
            rows = (k, int(w.shape[0]))
    if "num_classes" in state:
        n = state["num_classes"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: num_classes is {_short(n)}, not a "
                                  f"positive integer")
        if rows is not None and rows[1] != n:
            raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: num_classes is {n} but "
                                  f"{_short(rows[0])} has {rows[1]} rows")


def read_checkpoint(path: PathLike, map_location: MapLocation = "cpu") -> Dict[str, Any]:
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
        keys = ", ".join(_short(k, 40) for k in list(state)[:5]) + (", ..." if len(state) > 5 else "")
        bare = state and all(isinstance(v, torch.Tensor) for v in state.values())
        shown = _short(fmt)
        what = "a bare state_dict" if bare else (f"format {shown}" if fmt is not None else f"keys {keys}")
        raise CheckpointError(f"{path} is a torch file but not a ksl_ops checkpoint ({what}); `ksl eval` and "
                              f"`--resume` take the last.ckpt that `ksl train` writes")
    digits = found.group(1)
    if len(digits) > 9:  # (int() of thousands of digits raises an error that names no file)
        raise CheckpointError(f"{path} claims a ksl_ops checkpoint format version of {len(digits)} digits, "
                              f"which never existed")
    version = int(digits)
    if version > FORMAT_VERSION:
        from .._version import __version__

        raise CheckpointError(f"{path} is a ksl_ops checkpoint of format version {version}, newer than this "
                              f"ksl-ops ({__version__}) reads (up to {FORMAT_VERSION}); upgrade ksl-ops to load it")
    if version < 1:
        raise CheckpointError(f"{path} claims ksl_ops checkpoint format version {version}, which never existed")
    if version == 1:
        state = _upgrade_from_v1(state, path)
    for key, kind, name in (("epoch", int, "an integer"), ("model", dict, "a dict"), ("config", dict, "a dict")):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path} is an incomplete ksl_ops checkpoint: '{key}' is missing or not {name}")
    bad = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: model entry {_short(bad[0])} is not a "
                              f"tensor")
    _check_plain(state, path)
    if state["epoch"] < 0:
        raise CheckpointError(f"{path} is not a valid ksl_ops checkpoint: epoch is {state['epoch']}, below 0")
    _check_classifier(state, path)
    return state


def checkpoint_num_classes(state: Dict[str, Any]) -> Optional[int]:
    """The number of training identities of a checkpoint (its classifier size), None if unknown.
    (read_checkpoint has checked that a num_classes entry and the classifier agree.)"""
    if isinstance(state.get("num_classes"), int):
        return state["num_classes"]
    keys = _classifier_keys(state["model"])
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
    # load_state_dict would cast silently: complex to real drops a part, a float into an integer buffer
    # truncates. And a NaN or infinite weight only shows later, as a NaN loss or distance matrix.
    kinds = [f"{k} {have[k].dtype} vs {v.dtype}" for k, v in want.items() if k in have and (
             (have[k].is_complex() and not v.is_complex())
             or (have[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())))]
    problems: List[str] = []
    for what, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            names = [k if len(str(k)) <= 80 else _short(k) for k in items[:2]]
            problems.append(f"{len(items)} {what} entries (e.g. {', '.join(map(str, names))})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, checkpoint vs model (e.g. {'; '.join(shapes[:2])})")
    if kinds:
        problems.append(f"{len(kinds)} dtype mismatches, checkpoint vs model (e.g. {'; '.join(kinds[:2])})")
    if not problems:
        bad = [k for k in want if (have[k].is_floating_point() or have[k].is_complex())
               and not bool(torch.isfinite(have[k]).all())]
        if bad:
            problems.append(f"{len(bad)} entries hold NaN or infinite values (e.g. {', '.join(bad[:2])})")
    if problems:
        raise CheckpointError(f"{path} does not fit this {type(model).__name__}: {'; '.join(problems)}")
    try:
        model.load_state_dict(have)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this {type(model).__name__}: {exc}") from exc


def _check_optimizer_state(optimizer: Optimizer, path: PathLike) -> None:
    """CheckpointError unless every per-parameter buffer of the loaded optimizer state has its
    parameter's shape and a floating dtype (a step count may be a scalar), and every numeric
    hyper-parameter of its groups is finite."""
    for gi, group in enumerate(optimizer.param_groups):
        for name, v in group.items():
            if name == "params" or isinstance(v, bool) or v is None:
                continue
            values = v if isinstance(v, (tuple, list)) else [v]
            for x in values:
                if isinstance(x, torch.Tensor):
                    x = float(x) if x.numel() == 1 else float("nan")
                if not isinstance(x, (int, float)) or not math.isfinite(x):
                    raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer: group {gi} "
                                          f"{name} is {_short(v)}, not a finite number")
        for pi, p in enumerate(group["params"]):
            for name, buf in optimizer.state.get(p, {}).items():
                if buf is None:  # a buffer not made yet
                    continue
                if not isinstance(buf, torch.Tensor):
                    if name == "step" and isinstance(buf, (int, float)) and not isinstance(buf, bool):
                        continue
                    raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer: {_short(name)} "
                                          f"of parameter {pi} (group {gi}) is a {type(buf).__name__}, not a tensor")
                if name == "step":
                    ok = buf.numel() == 1
                else:
                    ok = buf.shape == p.shape and buf.is_floating_point()
                if not ok:
                    raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer: {_short(name)} "
                                          f"of parameter {pi} (group {gi}) is {buf.dtype} {list(buf.shape)}, the "
                                          f"parameter {p.dtype} {list(p.shape)}")


def load_checkpoint(path: PathLike, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[Optimizer] = None, scheduler: Optional[Stateful] = None,
                    map_location: MapLocation = "cpu", restore_rng: bool = False, backbone: Optional[str] = None,
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
    # A hand-edited file can be plain data and still not be a state these accept: whatever loading it
    # raises becomes one CheckpointError, and what torch does not check (the shapes of the optimizer's
    # buffers, finite hyper-parameters) is checked here, so that it fails now and not at the first step.
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer: {exc}") from exc
        _check_optimizer_state(optimizer, path)
    if scheduler is not None and state.get("scheduler") is not None:
        try:
            scheduler.load_state_dict(state["scheduler"])
        except Exception as exc:
            raise CheckpointError(f"{path}: its scheduler state cannot be restored: {exc!r}") from exc
    if restore_rng and state.get("rng") is not None:
        _check_rng(state["rng"], path)  # on scratch generators first: a bad state changes nothing
        try:
            set_rng_state(state["rng"])
        except Exception as exc:  # pragma: no cover - _check_rng tried the same calls
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
