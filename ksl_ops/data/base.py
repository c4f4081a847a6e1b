"""The dataset record shared by every parser, and the folder / file-name helpers they use.

A parsed Re-ID dataset is three lists of ``(path, pid, camid)``:

* ``train``   -- pids relabelled to ``0..num_train_pids-1`` (the classifier targets);
* ``query`` / ``gallery`` -- the dataset's own pids, kept as they are, because evaluation only
  compares them for equality and people cross-check results against the original ids.

Camera ids are 0-based everywhere (the file names count from 1).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from .._typing import StrPath

Item = Tuple[str, int, int]  # (image path, pid, camid)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

#: Identities and cameras are kept as int64 tensors (the loaders' batches, evaluation), so a number
#: read from a file name or list has at most this many digits (10**18 - 1 < 2**63).
MAX_DIGITS = 18


def parse_int(text: str, what: str, where: str, dataset: str) -> int:
    """``int(text)`` for a field read from a file name or list, or ValueError naming ``where`` (the
    file) if it has more than MAX_DIGITS digits: an int64 cannot hold it, and Python refuses to
    convert strings of thousands of digits with a message that names no file."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        shown = text if len(text) <= 24 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"
        raise ValueError(f"{dataset}: {what} {shown} in {where} has more than {MAX_DIGITS} digits "
                         f"(identities and cameras are stored as 64-bit integers)")
    return int(text)


class ReIDDataset:
    """A parsed Re-ID dataset: ``train``, ``query`` and ``gallery`` lists of ``(path, pid, camid)``.

    ``num_train_pids`` is the number of training identities (train pids are ``0..num_train_pids-1``)
    and ``num_train_cams`` the number of distinct cameras seen in training.
    """

    def __init__(self, name: str, root: StrPath, train: List[Item], query: List[Item],
                 gallery: List[Item]) -> None:
        self.name = str(name)
        self.root = str(root)
        self.train = list(train)
        self.query = list(query)
        self.gallery = list(gallery)
        train_pids = sorted({pid for _, pid, _ in self.train})
        if train_pids != list(range(len(train_pids))):
            raise ValueError(
                f"{self.name}: train pids must be relabelled to 0..P-1, got {train_pids[:10]}..."
            )
        self.num_train_pids = len(train_pids)
        self.num_train_cams = len({cam for _, _, cam in self.train})

    @staticmethod
    def stats(items: Sequence[Item]) -> Tuple[int, int, int]:
        """(number of identities, number of images, number of cameras) of one split."""
        return len({p for _, p, _ in items}), len(items), len({c for _, _, c in items})

    def summary(self) -> str:
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [
            f"{self.name} ({self.root})",
            f"  {'subset':<8} | {'# ids':>6} | {'# images':>8} | {'# cameras':>9}",
            "  " + "-" * 41,
        ]
        for label, items in rows:
            n_ids, n_img, n_cam = self.stats(items)
            lines.append(f"  {label:<8} | {n_ids:>6} | {n_img:>8} | {n_cam:>9}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ReIDDataset(name={self.name!r}, train={len(self.train)}, query={len(self.query)}, "
            f"gallery={len(self.gallery)}, num_train_pids={self.num_train_pids}, "
            f"num_train_cams={self.num_train_cams})"
        )


def relabel_train(items: Iterable[Item]) -> List[Item]:
    """Map train pids to 0..P-1 in ascending order of the original pid (stable and reproducible)."""
    items = list(items)
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], cam) for path, pid, cam in items]


def split_validation(dataset: ReIDDataset, num_val_ids: int, seed: int = 0) -> ReIDDataset:
    """Hold out ``num_val_ids`` training identities as a validation query/gallery split.

    The returned dataset trains on the other identities (relabelled to 0..P-1) and its ``query`` /
    ``gallery`` come from the held-out ones only: per held-out identity, one image of each of up to two
    cameras is a query and every other image is in the gallery (evaluation drops same-camera matches
    of the query identity, as on the test split). The test split is not touched, so a recipe chosen on
    this split has never seen a test identity. The held-out identities are drawn with ``seed``.
    """
    import random

    pids = sorted({pid for _, pid, _ in dataset.train})
    if not 0 < num_val_ids < len(pids):
        raise ValueError(f"num_val_ids must be in [1, {len(pids) - 1}] for {dataset.name} "
                         f"({len(pids)} training identities), got {num_val_ids}")
    val = set(random.Random(seed).sample(pids, num_val_ids))
    train = relabel_train(item for item in dataset.train if item[1] not in val)
    query: List[Item] = []
    gallery: List[Item] = []
    for pid in sorted(val):
        items = sorted((item for item in dataset.train if item[1] == pid), key=lambda it: (it[2], it[0]))
        query_cams: List[int] = []
        for path, _, cam in items:
            if cam not in query_cams and len(query_cams) < 2:
                query_cams.append(cam)
                query.append((path, pid, cam))
            else:
                gallery.append((path, pid, cam))
    return ReIDDataset(f"{dataset.name}-val{num_val_ids}", dataset.root, train, query, gallery)


def locate_dataset_dir(root: StrPath, dataset: str, required: Sequence[str], standard_names: Sequence[str],
                       suffix: str = "") -> Path:
    """Find the dataset folder: ``root`` itself or ``root/<standard name>`` (one or two levels).

    A candidate is accepted when it holds at least one of ``required``; it must then hold all of
    them, else FileNotFoundError names the missing one. ``suffix`` is a subfolder appended to each
    candidate (CUHK03-NP keeps its splits under ``detected/``). Standard names match
    case-insensitively, because people unpack archives under many spellings.
    """
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset}: dataset root {str(root)!r} does not exist or is not a folder")

    wanted = {n.lower() for n in standard_names}

    def children(folder: Path) -> List[Path]:
        try:
            return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() in wanted)
        except OSError:
            return []

    candidates = [root]
    for child in children(root):
        candidates.append(child)
        candidates.extend(children(child))
    if suffix:
        candidates = [c / suffix for c in candidates] + candidates

    for cand in candidates:
        if any((cand / r).is_dir() for r in required):
            for r in required:
                if not (cand / r).is_dir():
                    raise FileNotFoundError(f"{dataset}: expected folder {str(cand / r)!r} (not found)")
            return cand
    where = root / suffix / required[0] if suffix else root / required[0]
    raise FileNotFoundError(
        f"{dataset}: expected folder {str(where)!r}, or the dataset under one of the standard "
        f"names {list(standard_names)} inside {str(root)!r}; none found"
    )


def list_images(folder: Path) -> List[Path]:
    """Image files of one folder, sorted by name (so parsing is reproducible across file systems).

    Non-image files are ignored on purpose: the official Market-1501 archive ships a Thumbs.db in
    its image folders.
    """
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def parse_named_folder(folder: Path, dataset: str, pattern: re.Pattern, example: str,
                       keep_junk: bool = False, keep_distractors: bool = True) -> List[Item]:
    """Parse ``<pid>_c<cam>...`` file names of one folder into ``(path, pid, camid)``.

    ``pattern`` must have the groups ``pid`` and ``cam``. A file that does not match raises
    ValueError naming it: a silently shortened split would give wrong results without any sign.
    pid -1 (Market-1501 "junk") is dropped unless ``keep_junk``; pid 0 (Market-1501 distractors)
    is dropped unless ``keep_distractors`` (they belong in the gallery only).
    """
    items: List[Item] = []
    for path in list_images(folder):
        m = pattern.fullmatch(path.name)
        if m is None:
            raise ValueError(
                f"{dataset}: malformed image name {str(path)!r}; expected names like {example!r}"
            )
        pid = parse_int(m.group("pid"), "identity", repr(str(path)), dataset)
        cam = parse_int(m.group("cam"), "camera", repr(str(path)), dataset)
        if pid == -1 and not keep_junk:
            continue
        if pid == 0 and not keep_distractors:
            continue
        if pid < -1:
            raise ValueError(f"{dataset}: negative identity {pid} in image name {str(path)!r}")
        if cam < 1:
            raise ValueError(
                f"{dataset}: camera index must start at 1 in image name {str(path)!r}, got c{cam}"
            )
        items.append((str(path), pid, cam - 1))
    return items


def parse_bbox_layout(root: StrPath, dataset: str, standard_names: Sequence[str], pattern: re.Pattern,
                      example: str, suffix: str = "") -> ReIDDataset:
    """The Market-1501 style layout: ``bounding_box_train``, ``query``, ``bounding_box_test``."""
    folder = locate_dataset_dir(
        root, dataset, ("bounding_box_train", "query", "bounding_box_test"), standard_names, suffix
    )
    train = parse_named_folder(folder / "bounding_box_train", dataset, pattern, example,
                               keep_distractors=False)
    query = parse_named_folder(folder / "query", dataset, pattern, example, keep_distractors=False)
    gallery = parse_named_folder(folder / "bounding_box_test", dataset, pattern, example,
                                 keep_distractors=True)
    for label, items in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        if not items:
            raise ValueError(f"{dataset}: no usable images in {str(folder / label)!r}")
    return ReIDDataset(dataset, folder, relabel_train(train), query, gallery)
