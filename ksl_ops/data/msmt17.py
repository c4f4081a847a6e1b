"""MSMT17 (Wei et al., CVPR 2018): 1041 train / 3060 test identities, 15 cameras.

Layout (V1; ``root`` may be this folder or its parent)::

    MSMT17_V1/
        train/0000/0000_000_01_0303morning_0015_0.jpg     pid_{n}_{cam}_{date+time}_{frame}_{k}
        test/...
        list_train.txt   "0000/0000_000_01_0303morning_0015_0.jpg 0"   (path relative to train/, label)
        list_val.txt     (part of the training set in the usual protocol: train = train + val)
        list_query.txt   (paths relative to test/)
        list_gallery.txt

The V2 release (``mask_train_v2`` / ``mask_test_v2`` with the same lists) is accepted as well.
The identity is the label column of the list; the camera is the third field of the file name.
Parsing checks only the first image of each list for existence (stat-ing 126k files on a network
file system takes minutes); `ksl train` and `ksl eval` then check every image before they start
(ksl_ops.data.check), so a missing or damaged one is reported with its path before any training.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import List, Optional

from .._typing import StrPath
from .base import Item, ReIDDataset, locate_dataset_dir, parse_int, relabel_train

MSMT17_NAMES = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17", "msmt17_v1", "msmt17_v2")
MSMT17_PATTERN = re.compile(r"(?P<prefix>\d+)_(?P<n>\d+)_(?P<cam>\d+)_[^/]*\.[A-Za-z]+")
LAYOUTS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))


def _read_list(list_file: Path, image_dir: Path) -> List[Item]:
    if not list_file.is_file():
        raise FileNotFoundError(f"msmt17: expected list file {str(list_file)!r} (not found)")
    items: List[Item] = []
    try:
        with open(list_file, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise FileNotFoundError(f"msmt17: cannot read list file {str(list_file)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"msmt17: list file {str(list_file)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02X} at "
                         f"offset {exc.start}, line {lineno}); expected lines '<relative image path> <integer label>'"
                         ) from None
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(
                f"msmt17: malformed line {lineno} of {str(list_file)!r}: {line[:120]!r}; expected "
                f"'<relative image path> <integer label>'"
            )
        where = f"line {lineno} of {str(list_file)!r}"
        rel, pid = parts[0], parse_int(parts[1], "label", where, "msmt17")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"msmt17: image path {rel[:120]!r} on {where} must be relative to "
                             f"{str(image_dir)!r} and stay inside it")
        m = MSMT17_PATTERN.fullmatch(Path(rel).name)
        if m is None:
            raise ValueError(
                f"msmt17: malformed image name {str(image_dir / rel)!r} (line {lineno} of "
                f"{str(list_file)!r}); expected names like '0000_000_01_0303morning_0015_0.jpg'"
            )
        cam = parse_int(m.group("cam"), "camera", where, "msmt17")
        if cam < 1 or pid < 0:
            raise ValueError(
                f"msmt17: bad camera c{cam} or label {pid} for {str(image_dir / rel)!r} "
                f"(line {lineno} of {str(list_file)!r})"
            )
        items.append((str(image_dir / rel), pid, cam - 1))
    if items and not Path(items[0][0]).is_file():
        raise FileNotFoundError(
            f"msmt17: image {items[0][0]!r} listed in {str(list_file)!r} does not exist"
        )
    return items


def load_msmt17(root: StrPath) -> ReIDDataset:
    """Parse an MSMT17 (V1 or V2) folder; train = list_train + list_val, as is customary."""
    first_error: Optional[FileNotFoundError] = None
    for train_dir, test_dir in LAYOUTS:
        try:
            folder = locate_dataset_dir(root, "msmt17", (train_dir, test_dir), MSMT17_NAMES)
            break
        except FileNotFoundError as exc:
            first_error = first_error or exc
    else:
        assert first_error is not None  # LAYOUTS is not empty
        raise first_error
    train = _read_list(folder / "list_train.txt", folder / train_dir)
    val_list = folder / "list_val.txt"
    if val_list.is_file():
        train += _read_list(val_list, folder / train_dir)
    else:
        warnings.warn(f"msmt17: {str(val_list)!r} not found; training on list_train.txt only",
                      UserWarning, stacklevel=2)
    query = _read_list(folder / "list_query.txt", folder / test_dir)
    gallery = _read_list(folder / "list_gallery.txt", folder / test_dir)
    for label, items in (("list_train.txt", train), ("list_query.txt", query),
                         ("list_gallery.txt", gallery)):
        if not items:
            raise ValueError(f"msmt17: {str(folder / label)!r} lists no images")
    return ReIDDataset("msmt17", folder, relabel_train(train), query, gallery)
