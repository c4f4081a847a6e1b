"""Where a run writes, checked before the work that produces what it writes.

A run's folder that turns out to be unwritable only at the checkpoint after the first epoch (or a
JSON path only after an evaluation) loses that work. These checks run first and raise a ValueError
that names the path and says what is wrong, so the command line prints one line and exits 2.

Writability is tested by creating (and removing) a file, not with ``os.access``: for root, access()
reports every folder writable, while creating a file fails on a read-only file system, in a folder
under a file, or for a user without the permission.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable, List, Union

from .checkpoint import remove_stale_temp_files

__all__ = ["prepare_output_dir", "check_output_file", "OutputPathError"]

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """A path the run would write to cannot be written; the message names it and says why."""


def _file_in_the_way(path: Path, what: str) -> None:
    """OutputPathError if `path` or one of its parents exists as something other than a folder."""
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {str(p)!r}, which is a file, not a folder"
                raise OutputPathError(f"{what} {str(path)!r} {where}")
            return


def _probe(folder: Path, what: str) -> None:
    probe = folder / f".ksl-write-test.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{what} {str(folder)!r} cannot be written ({exc.strerror or exc}); nothing was "
                              f"run. Make it writable or choose another") from None


def prepare_output_dir(path: PathLike, names: Iterable[str] = ()) -> List[Path]:
    """Create the run folder `path` if needed and check that files can be created in it, and that none
    of `names` (the files the run writes there) is a folder; then remove the temp files an interrupted
    atomic write of one of `names` left behind. Returns the temp files removed."""
    path = Path(os.path.expanduser(os.fspath(path)))
    _file_in_the_way(path, "output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the output folder {str(path)!r} ({exc.strerror or exc})") from None
    _probe(path, "output folder")
    removed: List[Path] = []
    for name in names:
        target = path / name
        if target.is_dir():
            raise OutputPathError(f"{str(target)!r} is a folder; the run writes a file of that name there")
        removed += remove_stale_temp_files(target)
        plain_tmp = path / f".{name}.tmp"  # the fixed temp name of the JSON writer
        if plain_tmp.is_file() and not plain_tmp.is_symlink():
            plain_tmp.unlink()
            removed.append(plain_tmp)
    return removed


def check_output_file(path: PathLike, option: str, inputs: Iterable[PathLike] = ()) -> Path:
    """Check, before the work that produces it, that the file `path` (given as `option`) can be written:
    its folder exists (or can be created) and accepts new files, `path` is not a folder, and it is none
    of `inputs` (the files the command reads, e.g. the checkpoint, which writing would destroy)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a folder, not a file path")
    for src in inputs:
        src = Path(os.path.expanduser(os.fspath(src)))
        if path.resolve() == src.resolve():
            raise OutputPathError(f"{option} {str(path)!r} is the input file {str(src)!r}; writing there would "
                                  f"destroy it")
    folder = path.parent
    _file_in_the_way(folder, f"{option}: the folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{option}: cannot create the folder {str(folder)!r} ({exc.strerror or exc})") from None
    _probe(folder, f"{option}: the folder")
    return path
