"""DataLoaders for Re-ID: a training loader (random or P x K) and the query / gallery loaders.

Batches are ``(images [N, 3, H, W] float32, pids int64 [N], camids int64 [N])``. Train batches use
relabelled pids (the classifier targets); query and gallery batches use the dataset's own pids.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import Item, ReIDDataset
from .samplers import RandomIdentitySampler, RandomSampler
from .transforms import build_transforms


class ImageDataset(Dataset):
    """Reads ``(path, pid, camid)`` items with PIL (converted to RGB) and applies ``transform``."""

    def __init__(self, items: Sequence[Item], transform: Optional[Callable] = None):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, int, int]:
        path, pid, camid = self.items[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as exc:  # name the file: a worker's traceback alone does not say which
            raise OSError(f"ImageDataset: cannot read image {path!r}: {exc}") from exc
        if self.transform is not None:
            img = self.transform(img)
        return img, pid, camid


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a worker from torch's per-worker seed (torch's is already set
    from the loader's generator), so anything random in a transform is reproducible."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _check_common(dataset: object, height: int, width: int, batch_size: int, workers: int) -> None:
    if not isinstance(dataset, ReIDDataset):
        raise TypeError(f"dataset must be a ReIDDataset (see build_dataset), got {type(dataset).__name__}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(workers) < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")


def build_train_loader(dataset: ReIDDataset, height: int, width: int, batch_size: int,
                       sampler: Literal["random", "pk"] = "random", num_instances: int = 4, workers: int = 2,
                       seed: int = 0,
                       persistent_workers: bool = False, pin_memory: Optional[bool] = None,
                       transform: Optional[Callable] = None, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """Training loader over ``dataset.train`` with the training transforms.

    ``sampler="random"``: a fresh permutation every epoch (:class:`RandomSampler`);
    ``sampler="pk"``: :class:`RandomIdentitySampler` with K = ``num_instances`` (``batch_size``
    must be a multiple of it). ``loader.sampler.set_epoch(e)`` makes the order of epoch e
    reproducible in both cases. Incomplete last batches are dropped (BatchNorm needs > 1 sample
    and P x K needs whole identities).

    Several processes: ``num_replicas`` = W > 1 and this process's ``rank`` give the distributed
    samplers of :mod:`ksl_ops.data.distributed_samplers`; ``batch_size`` is then the batch per rank
    (the global batch is W times it).
    """
    _check_common(dataset, height, width, batch_size, workers)
    smp: Sampler[int]
    if num_replicas != 1 and sampler in ("random", "pk"):
        from .distributed_samplers import DistributedRandomIdentitySampler, DistributedRandomSampler

        if sampler == "random":
            smp = DistributedRandomSampler(len(dataset.train), batch_size, num_replicas, rank, seed=seed)
        else:
            smp = DistributedRandomIdentitySampler([pid for _, pid, _ in dataset.train], batch_size,
                                                   num_instances, num_replicas, rank, seed=seed)
    elif sampler == "random":
        if batch_size > len(dataset.train):
            raise ValueError(f"batch_size ({batch_size}) is larger than the training set "
                             f"({len(dataset.train)} images)")
        smp = RandomSampler(len(dataset.train), seed=seed)
    elif sampler == "pk":
        smp = RandomIdentitySampler([pid for _, pid, _ in dataset.train], batch_size, num_instances,
                                    seed=seed)
    else:
        raise ValueError(f"sampler must be 'random' or 'pk', got {sampler!r}")
    tf = transform if transform is not None else build_transforms(height, width, train=True)
    return DataLoader(
        ImageDataset(dataset.train, tf),
        batch_size=int(batch_size),
        sampler=smp,
        num_workers=int(workers),
        drop_last=True,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        persistent_workers=bool(persistent_workers) and int(workers) > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(int(seed)),
    )


def build_test_loaders(dataset: ReIDDataset, height: int, width: int, batch_size: int,
                       workers: int = 2, pin_memory: Optional[bool] = None,
                       transform: Optional[Callable] = None) -> Tuple[DataLoader, DataLoader]:
    """``(query_loader, gallery_loader)``: dataset order, no augmentation, every image kept."""
    _check_common(dataset, height, width, batch_size, workers)
    tf = transform if transform is not None else build_transforms(height, width, train=False)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

    def make(items: Sequence[Item]) -> DataLoader:
        return DataLoader(ImageDataset(items, tf), batch_size=int(batch_size), shuffle=False,
                          num_workers=int(workers), drop_last=False, pin_memory=pin)

    return make(dataset.query), make(dataset.gallery)
