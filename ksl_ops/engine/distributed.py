"""What the trainer needs to run as one of several processes (torch.distributed, DDP, torchrun).

    torchrun --standalone --nproc_per_node=2 -m ksl_ops.cli train ...
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m ksl_ops.cli train ...

`DistEnv.setup` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR/PORT): `nccl` when training on CUDA, `gloo` on CPU. Without those variables
(or with WORLD_SIZE=1) everything here is a no-op and the trainer runs as one process.

Conventions of a run on W ranks:
- `batch_size` in the config is the **global** batch; each rank loads batch_size / W images (P×K:
  P / W whole identities per rank, different from the other ranks'), so the optimisation step is
  the one-process step on the same global batch and the learning rate needs no change.
- KSLLoss mines triplets across ranks and returns W times each rank's share of the global loss
  (ksl_ops.distributed), so DDP's gradient average is the gradient of the global loss.
- Rank 0 alone prints, draws progress bars, evaluates, writes checkpoints and metrics; the other
  ranks wait at a barrier meanwhile. Checkpoints hold the unwrapped model (no "module." prefix),
  whose state is the same on every rank, and restore on any W.
- Each rank seeds its augmentation and dropout streams from (seed, epoch, rank), so ranks do not
  draw identical crops and flips; rank 0 uses the one-process stream.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistEnv"]

# Rank 0's evaluation and checkpoint writing keep the other ranks waiting at a barrier or in the next
# collective; the default timeouts (10 min for NCCL) are short for evaluating a large gallery.
TIMEOUT = datetime.timedelta(minutes=60)


class DistEnv:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group = owns_group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group for KSLLoss (None when not distributed)."""
        return dist.group.WORLD if self.enabled else None

    @classmethod
    def setup(cls, device: torch.device) -> Tuple[DistEnv, torch.device]:
        """Join the process group torchrun set up the environment for; returns (env, device).

        On CUDA each process uses the GPU of its LOCAL_RANK."""
        if dist.is_available() and dist.is_initialized():  # the caller set up the group itself
            env = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
            env = cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)
        else:
            return cls(), device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        return env, device

    def per_rank_batch(self, batch_size: int, num_instances: int) -> int:
        """The batch each rank loads; the global batch must split into whole identities per rank."""
        if not self.enabled:
            return batch_size
        unit = self.world_size * num_instances
        if batch_size % unit:
            raise ValueError(f"batch_size ({batch_size}, the global batch) must be a multiple of "
                             f"{self.world_size} ranks x num_instances ({num_instances}) so that every rank "
                             f"gets whole identities; e.g. --batch-size {max(1, round(batch_size / unit)) * unit}")
        return batch_size // self.world_size

    def wrap(self, model: torch.nn.Module, device: torch.device, sync_bn: bool = False
             ) -> Tuple[torch.nn.Module, torch.nn.Module]:
        """(model, train_model): the model whose state is saved and evaluated (BatchNorm converted to
        SyncBatchNorm if asked) and what the training step calls (DDP around it when distributed)."""
        if sync_bn and self.enabled:
            if device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; on CPU each "
                                 "rank normalises with the statistics of its own batch")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if not self.enabled:
            return model, model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return model, DDP(model, device_ids=ids, output_device=device.index if ids else None)

    def rank_seed(self, seed: int) -> int:
        """A per-rank seed for augmentation and dropout; rank 0 keeps `seed`."""
        return (seed + 1_000_003 * self.rank) % (2 ** 31)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. rendering the synthetic set), then the others."""
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def reduce_record(self, record: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        """An epoch record for the whole run: each loss averaged over ranks (the single-process loss
        on the global batch, by KSLLoss's convention), images/s of all ranks together."""
        if not self.enabled:
            return record
        keys = sorted(record["loss"])
        images = record["images_per_s"] * record["time_s"]
        sums = torch.tensor([record["loss"][k] for k in keys] + [images], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        slowest = torch.tensor([record["time_s"]], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        total, time_s = sums.tolist(), float(slowest)
        out = dict(record)
        out["loss"] = {k: total[i] / self.world_size for i, k in enumerate(keys)}
        out["time_s"] = time_s
        out["images_per_s"] = total[-1] / max(time_s, 1e-9)
        out["world_size"] = self.world_size
        return out

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def main_only(env: Optional[DistEnv], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` on rank 0, a no-op elsewhere (for log callbacks)."""
    if env is None or env.is_main:
        return fn
    return lambda *a, **k: None
