"""Samplers for Re-ID training: plain random order, and P x K identity batches for triplet losses.

Both are deterministic functions of ``(seed, epoch)``: ``set_epoch(e)`` before each epoch makes the
order reproducible and resumable (the DistributedSampler convention). If an epoch starts without
``set_epoch`` having been called since the last one, the epoch advances by one by itself, so a
loop that never calls it still gets a new order every epoch.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler


def _as_pids(pids: Iterable[Any]) -> List[int]:
    """Accept pids as ints or as dataset items ``(path, pid, camid)``."""
    out = []
    for p in pids:
        if isinstance(p, (tuple, list)):
            p = p[1]
        out.append(int(p))
    return out


class _EpochMixin:
    def _init_epoch(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{type(self).__name__}: seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0
        self._started = False  # an iteration began since the last set_epoch

    def set_epoch(self, epoch: int) -> None:
        """Use the order of this epoch for the next iteration."""
        if int(epoch) < 0:
            raise ValueError(f"{type(self).__name__}.set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self._started = False

    def _next_epoch_rng(self) -> np.random.Generator:
        if self._started:
            self.epoch += 1
        self._started = True
        return np.random.default_rng([self.seed, self.epoch])


class RandomSampler(_EpochMixin, Sampler):
    """A random permutation of ``range(num_samples)``, one per epoch."""

    def __init__(self, num_samples: int, seed: int = 0):
        if int(num_samples) < 1:
            raise ValueError(f"RandomSampler: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self._init_epoch(seed)

    def __iter__(self) -> Iterator[int]:
        rng = self._next_epoch_rng()
        return iter(rng.permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


class RandomIdentitySampler(_EpochMixin, Sampler):
    """P x K sampling: every consecutive ``batch_size`` indices hold P = batch_size / K identities,
    K = ``num_instances`` images each (drawn with replacement for identities with fewer than K).

    Per epoch: each identity's images are shuffled and cut into chunks of K (identities with fewer
    than K images are topped up with repeats, to one chunk; a remainder shorter than K is dropped,
    a different one each epoch). The chunks are laid out over T batches so that no batch holds an
    identity twice: identities in random order, each repeated once per chunk, are dealt
    column-wise into a T x P table (consecutive copies of an identity land in different rows as long
    as it has at most T chunks). T is the largest number of batches the chunk counts allow, so
    ``len(sampler) = T * P * K`` depends only on the pids, not on the seed or the epoch; surplus
    chunks (at most those of identities with more than T chunks, plus fewer than P others) are left
    out of that epoch. Rows are then shuffled.

    ``pids``: the pid of every dataset index (ints, or the dataset's ``(path, pid, camid)`` items).
    """

    def __init__(self, pids: Sequence[Any], batch_size: int, num_instances: int, seed: int = 0):
        pids = _as_pids(pids)
        if int(num_instances) < 1:
            raise ValueError(f"RandomIdentitySampler: num_instances must be >= 1, got {num_instances}")
        if int(batch_size) < int(num_instances) or int(batch_size) % int(num_instances):
            raise ValueError(f"RandomIdentitySampler: batch_size ({batch_size}) must be a positive "
                             f"multiple of num_instances ({num_instances})")
        self.batch_size, self.num_instances = int(batch_size), int(num_instances)
        self.num_pids_per_batch = self.batch_size // self.num_instances
        index_of: Dict[int, List[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            index_of[pid].append(i)
        self.index_of = dict(sorted(index_of.items()))
        self.pids = list(self.index_of)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(
                f"RandomIdentitySampler: a batch of {self.batch_size} with num_instances="
                f"{self.num_instances} needs {self.num_pids_per_batch} identities, the data has "
                f"{len(self.pids)}"
            )
        self._chunks = np.array([max(len(v), self.num_instances) // self.num_instances
                                 for v in self.index_of.values()])
        self.num_batches = self._max_batches(self._chunks, self.num_pids_per_batch)
        self._init_epoch(seed)

    @staticmethod
    def _max_batches(chunks: np.ndarray, P: int) -> int:
        # T batches of P distinct identities are possible iff sum_i min(c_i, T) >= P * T
        t = int(chunks.sum()) // P
        while t > 0 and int(np.minimum(chunks, t).sum()) < P * t:
            t -= 1
        return t

    def epoch_batches(self, rng: np.random.Generator) -> List[List[int]]:
        """The batches (lists of dataset indices) of one epoch drawn from ``rng``."""
        K, P, T = self.num_instances, self.num_pids_per_batch, self.num_batches
        chunks_of: List[List[List[int]]] = []
        for pid_idxs in self.index_of.values():
            idxs = np.asarray(pid_idxs)
            if len(idxs) < K:
                idxs = np.concatenate([idxs, rng.choice(idxs, K - len(idxs), replace=True)])
            idxs = rng.permutation(idxs)
            n = len(idxs) // K
            chunks_of.append([idxs[j * K:(j + 1) * K].tolist() for j in range(n)])
        # identities in random order, each repeated once per chunk (at most T), dealt column-wise
        slots: List[List[int]] = []
        for i in rng.permutation(len(chunks_of)):
            slots.extend(chunks_of[i][:T])
        slots = slots[:T * P]
        table: List[List[int]] = [[] for _ in range(T)]
        for k, chunk in enumerate(slots):
            table[k % T].extend(chunk)
        return [table[r] for r in rng.permutation(T)]

    def __iter__(self) -> Iterator[int]:
        rng = self._next_epoch_rng()
        return iter([i for batch in self.epoch_batches(rng) for i in batch])

    def __len__(self) -> int:
        return self.num_batches * self.batch_size
