"""Re-ID data: dataset parsers, the synthetic set, transforms, samplers and loaders.

    ds = build_dataset("market1501", "/data")          # or dukemtmc, cuhk03, msmt17, synthetic
    print(ds.summary())
    train_loader = build_train_loader(ds, 256, 128, batch_size=64, sampler="pk", num_instances=4)
    query_loader, gallery_loader = build_test_loaders(ds, 256, 128, batch_size=128)

``root`` may be the dataset folder itself or its parent (the standard folder names are searched,
case-insensitively). What each parser accepts is described in its module's docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .._typing import StrPath
from .base import ReIDDataset, relabel_train, split_validation
from .cuhk03 import load_cuhk03
from .dukemtmc import load_dukemtmc
from .loader import ImageDataset, build_test_loaders, build_train_loader
from .market1501 import load_market1501
from .msmt17 import load_msmt17
from .samplers import RandomIdentitySampler, RandomSampler
from .synthetic import render_synthetic, synthetic_preview
from .transforms import (
    Compose,
    Normalize,
    Pad,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPatch,
    Resize,
    ToTensor,
    build_transforms,
)

SYNTHETIC_NAMES = ("synthetic", "synthetic-reid", "synthetic_reid")


def load_synthetic(root: StrPath) -> ReIDDataset:
    """The synthetic set, parsed by the Market-1501 parser.

    ``root`` is a folder rendered by :func:`render_synthetic` or its parent. If no rendered set is
    found, the default one is rendered first: into ``root`` when it is missing or empty, else into
    ``root/synthetic``.
    """
    root = Path(root).expanduser()
    candidates = [root] + [root / n for n in SYNTHETIC_NAMES]
    if not any((c / "bounding_box_train").is_dir() for c in candidates):
        empty = not root.exists() or (root.is_dir() and not any(root.iterdir()))
        render_synthetic(root if empty else root / "synthetic")
    return load_market1501(root, name="synthetic", standard_names=SYNTHETIC_NAMES)


DATASETS = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "cuhk03": load_cuhk03,
    "msmt17": load_msmt17,
    "synthetic": load_synthetic,
}


_ALIASES = {"market": "market1501", "duke": "dukemtmc", "dukemtmcreid": "dukemtmc", "cuhk03np": "cuhk03",
            "msmt": "msmt17"}


def dataset_key(name: object) -> Optional[str]:
    """The :data:`DATASETS` key a dataset name means (case, '-' and '_' do not matter; short aliases
    such as "market" or "duke" are accepted), None if it means none."""
    if not isinstance(name, str):
        return None
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    return key if key in DATASETS else None


def build_dataset(name: str, root: StrPath) -> ReIDDataset:
    """Parse dataset ``name`` (one of :data:`DATASETS`) found at ``root``."""
    key = dataset_key(name)
    if key is None:
        raise ValueError(f"build_dataset: unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[key](root)


__all__ = [
    "ReIDDataset",
    "DATASETS",
    "build_dataset",
    "dataset_key",
    "load_market1501",
    "load_dukemtmc",
    "load_cuhk03",
    "load_msmt17",
    "load_synthetic",
    "relabel_train",
    "split_validation",
    "render_synthetic",
    "synthetic_preview",
    "build_transforms",
    "Compose",
    "ToTensor",
    "Resize",
    "RandomHorizontalFlip",
    "Pad",
    "RandomCrop",
    "Normalize",
    "RandomErasing",
    "RandomPatch",
    "RandomSampler",
    "RandomIdentitySampler",
    "ImageDataset",
    "build_train_loader",
    "build_test_loaders",
]
