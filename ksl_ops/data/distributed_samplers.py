"""Samplers for several processes: each rank draws its share of the *global* batches.

Every rank builds the same epoch from ``(seed, epoch)`` -- the single-process sampler's epoch with the
global batch size -- and keeps its slice of each global batch. So the batches of all ranks at a step,
concatenated in rank order, are the batch one process would draw with the global batch size; the
order of an epoch does not depend on the number of ranks (a checkpoint resumes on any world size
with the same data order), and ranks never share an index within an epoch.

- :class:`DistributedRandomIdentitySampler` (P×K): a global batch holds W·P identities, K images
  each; rank r takes identities r·P ... r·P + P - 1 of it, each with all its K images, so every
  rank's batch is itself a P×K batch of whole identities, different from the other ranks'.
- :class:`DistributedRandomSampler`: rank r takes positions r·b ... r·b + b - 1 of each global batch
  of the epoch's permutation (b = the batch per rank).

Use the per-rank batch size in the DataLoader (``drop_last`` is implied: incomplete global batches are
never drawn), and ``set_epoch(e)`` before each epoch as with :class:`RandomIdentitySampler`.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence

from torch.utils.data import Sampler

from .samplers import RandomIdentitySampler, _EpochMixin

__all__ = ["DistributedRandomIdentitySampler", "DistributedRandomSampler"]


def _check_rank(cls: str, num_replicas: int, rank: int) -> None:
    for name, v in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{cls}: {name} must be an int, got {type(v).__name__}")
    if num_replicas < 1:
        raise ValueError(f"{cls}: num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"{cls}: rank must be in [0, {num_replicas}), got {rank}")


class DistributedRandomIdentitySampler(Sampler):
    """P×K batches per rank: ``batch_size`` (per rank) = P·K, the global batch W·P·K.

    ``pids``: the pid of every dataset index (ints or ``(path, pid, camid)`` items). The global epoch
    is :class:`RandomIdentitySampler` ``(pids, W·batch_size, num_instances, seed)``; see there how
    identities with few or many images are handled.
    """

    def __init__(self, pids: Sequence, batch_size: int, num_instances: int, num_replicas: int, rank: int,
                 seed: int = 0):
        _check_rank(type(self).__name__, num_replicas, rank)
        self.num_replicas, self.rank = num_replicas, rank
        self.batch_size = int(batch_size)
        if self.batch_size < 1 or self.batch_size % int(num_instances):
            raise ValueError(f"{type(self).__name__}: the batch per rank ({batch_size}) must be a positive "
                             f"multiple of num_instances ({num_instances})")
        self.global_sampler = RandomIdentitySampler(pids, self.batch_size * num_replicas, num_instances, seed)
        self.num_instances = self.global_sampler.num_instances
        self.num_batches = self.global_sampler.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.global_sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.global_sampler.epoch

    def rank_batches(self) -> List[List[int]]:
        """This rank's batches of the next epoch (advances the epoch like iterating does)."""
        b = self.batch_size
        rng = self.global_sampler._next_epoch_rng()
        # A global batch is laid out identity by identity, K consecutive indices each, so a slice of
        # P·K positions starting at a multiple of K holds P whole identities.
        return [batch[self.rank * b:(self.rank + 1) * b] for batch in self.global_sampler.epoch_batches(rng)]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.rank_batches() for i in batch])

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


class DistributedRandomSampler(_EpochMixin, Sampler):
    """One random permutation per epoch (shared by all ranks), dealt in global batches of
    W·``batch_size``; rank r keeps its ``batch_size`` positions of each. The last incomplete global
    batch is dropped."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int = 0):
        _check_rank(type(self).__name__, num_replicas, rank)
        if int(batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.num_replicas, self.rank = num_replicas, rank
        self.num_batches = self.num_samples // (self.batch_size * num_replicas)
        if self.num_batches == 0:
            raise ValueError(f"{type(self).__name__}: a global batch of {self.batch_size * num_replicas} "
                             f"({num_replicas} ranks x {self.batch_size}) is larger than the {num_samples} samples")
        self._init_epoch(seed)

    def __iter__(self) -> Iterator[int]:
        perm = self._next_epoch_rng().permutation(self.num_samples)
        b, g = self.batch_size, self.batch_size * self.num_replicas
        return iter([int(i) for t in range(self.num_batches)
                     for i in perm[t * g + self.rank * b: t * g + (self.rank + 1) * b]])

    def __len__(self) -> int:
        return self.num_batches * self.batch_size
