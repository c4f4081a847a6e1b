"""Cross-rank hard mining for several processes (torch.distributed).

With W processes (ranks) each holding a local batch of n samples, batch-hard mining should search
the whole global batch of W·n samples, as one process training on the concatenated batch would:
the hardest negative of an anchor is often on another rank. `branch_triplet(..., process_group=g)`
therefore gathers every rank's embeddings and labels (a differentiable all-gather: the gradient a
rank's loss sends to another rank's samples travels back to that rank), mines each *local* anchor
against *all* candidates, and divides `mean` by the global number of valid anchors.

The scaling convention, for every KSLLoss term alike
----------------------------------------------------
Let L be the single-process loss on the concatenated batch and L_r the part of it that rank r's
anchors (samples) contribute, so that L = Σ_r L_r. **Each rank returns W·L_r.** DDP averages the
gradients over the W ranks, so every parameter receives (1/W) Σ_r ∇(W·L_r) = ∇L: exactly the
single-process gradient. The mean over ranks of the returned values is L, which is what a log of the
loss averaged over ranks shows.

- Triplets (aux_t, ksl_h): W · Σ_{local valid anchors} term / V, V = valid anchors of the global
  batch; `sum` is W · Σ_{local} term; `none` returns the local anchors' terms unscaled.
- Per-sample terms (cross-entropy, KSL-P, KSL-E): with the same n on every rank, W·L_r is
  W · Σ_{local} term / (W·n) = the local mean, so they are computed locally and unchanged.

Every rank must pass the same shapes (B, n, L), dtype and device: the all-gather needs equal sizes
and types, and the per-sample terms' convention assumes equal n. A mismatch raises the same error on
every rank before any data is gathered. The P×K samplers of ksl_ops.data give that.

Cost: the gathered batch goes through the fused op, which mines every anchor of the global batch;
each rank keeps only its own anchors' terms. That is W times the triplet work one rank needs, in
exchange for reusing the op (and its backward) unchanged; at Re-ID sizes (W·n up to a few hundred)
the triplet is a small share of a step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._typing import Reduction

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# A per-anchor triplet function: (e_all, labels_all, margin, "none") -> (self_terms, cross_terms).
TripletFn = Callable[[torch.Tensor, torch.Tensor, Optional[float], Reduction], Tuple[torch.Tensor, torch.Tensor]]

__all__ = ["gather_batch", "branch_triplet", "world_size", "rank"]

# The tensor forms of these collectives are all_gather_single and reduce_scatter_single from torch 2.13
# on (gloo reduce-scatters there too); torch 2.11 and 2.12 (in the supported range) have
# all_gather_into_tensor, and gloo there has no reduce-scatter.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None)


def world_size(group: Optional[ProcessGroup]) -> int:
    return dist.get_world_size(group=group)


def rank(group: Optional[ProcessGroup]) -> int:
    return dist.get_rank(group=group)


def _check_group(group: Optional[ProcessGroup]) -> None:
    if not dist.is_available():
        raise RuntimeError("process_group was given but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or pass process_group=None)")


class _GatherBatch(torch.autograd.Function):
    """[B, n, ...] on every rank -> [B, W·n, ...] (rank r's samples at r·n ... r·n + n - 1).

    Backward: rank r's slice of the gradient is the sum over ranks of what each rank's loss sends to
    it (a reduce-scatter), so each rank's backward sees the gradient of Σ_s L_s w.r.t. its samples.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
        ctx.group, ctx.world, ctx.rank = group, world_size(group), rank(group)
        return _all_gather_dim1(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        W = ctx.world
        n = grad.size(1) // W
        per_rank = grad.unflatten(1, (W, n)).movedim(1, 0).contiguous()  # [W, B, n, ...]
        local = per_rank.new_empty(per_rank.shape[1:])
        if _reduce_scatter_single is not None:
            _reduce_scatter_single(local, per_rank.flatten(0, 1), group=ctx.group)
        elif dist.get_backend(ctx.group) != dist.Backend.GLOO:
            dist.reduce_scatter_tensor(local, per_rank.flatten(0, 1), group=ctx.group)
        else:  # gloo before torch 2.13 has no reduce-scatter: sum everything, keep this rank's part
            dist.all_reduce(per_rank, group=ctx.group)
            local = per_rank[ctx.rank]
        return local, None


def gather_batch(x: torch.Tensor, group: Optional[ProcessGroup], dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order: dim=1 for branches [B, n, ...]
    (differentiable when `x` requires grad), dim=0 for labels [n] (no gradient)."""
    _check_group(group)
    if world_size(group) == 1:
        return x
    if dim not in (0, 1):
        raise ValueError(f"gather_batch: dim must be 0 or 1, got {dim}")
    if dim == 0:
        return _all_gather_dim1(x.detach().unsqueeze(0), group).squeeze(0)
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherBatch.apply(x, group)
    return _all_gather_dim1(x, group)


def _all_gather_dim1(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    x = x.contiguous()
    W = world_size(group)
    out = x.new_empty((W * x.size(0),) + tuple(x.shape[1:]))  # ranks stacked along dim 0
    _all_gather_single(out, x, group=group)
    return out.view((W,) + tuple(x.shape)).movedim(0, 1).flatten(1, 2)


# What every rank describes of its embeddings before the all-gather: B, n, L, the dtype (an index into
# _DTYPES: the public API admits only these) and the device type (an index into _DEVICE_TYPES, the
# last index for any other type). Only the type is compared: each rank has its own GPU (cuda:0 on
# rank 0, cuda:1 on rank 1 is the usual layout).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda", "meta")


def _describe(e: torch.Tensor) -> List[int]:
    kind = _DEVICE_TYPES.index(e.device.type) if e.device.type in _DEVICE_TYPES else len(_DEVICE_TYPES)
    return list(e.shape) + [_DTYPES.index(e.dtype), kind]


def _device_type_name(kind: int) -> str:
    return _DEVICE_TYPES[kind] if kind < len(_DEVICE_TYPES) else "another device type"


def _collective_device(group: Optional[ProcessGroup], e: torch.Tensor) -> torch.device:
    """Where the description is all-gathered: on the CPU for gloo (which every rank can reach whatever
    device its embeddings are on), on the current GPU for nccl, else on the embeddings' device."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend.startswith("cpu"):
        return torch.device("cpu")
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return e.device


def _check_same_shapes(e: torch.Tensor, group: Optional[ProcessGroup]) -> None:
    """Ranks must agree on [B, n, L], dtype and device: a mismatched all-gather aborts the process
    (gloo: SIGABRT) or hangs (nccl). One tiny all-gather and a host read, after which every rank
    raises the same error; skipped where values cannot be read (torch.compile, CUDA-graph capture)."""
    if world_size(group) == 1 or torch.compiler.is_compiling() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    mine = torch.tensor([_describe(e)], dtype=torch.int64, device=_collective_device(group, e))
    ranks = _all_gather_dim1(mine.unsqueeze(0), group).squeeze(0).tolist()
    shapes = [tuple(d[:3]) for d in ranks]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"embeddings: every rank of the process group must pass the same shape [B, N, L]; "
                         f"the ranks have {', '.join(f'rank {i}: {s}' for i, s in enumerate(shapes))}")
    if any(d[3] != ranks[0][3] for d in ranks):
        raise TypeError("embeddings: every rank of the process group must pass the same dtype; the ranks have "
                        + ", ".join(f"rank {i}: {_DTYPES[d[3]]}" for i, d in enumerate(ranks)))
    if any(d[4] != ranks[0][4] for d in ranks):
        raise ValueError("embeddings: every rank of the process group must pass them on the same device type; the "
                         "ranks have " + ", ".join(f"rank {i}: {_device_type_name(d[4])}" for i, d in enumerate(ranks))
                         + f" (this rank, {rank(group)}, has {e.device})")


def _valid_anchor_count(labels: torch.Tensor) -> torch.Tensor:
    """Anchors with another sample of their identity and a sample of another identity (on device)."""
    same = labels[:, None] == labels[None, :]
    n_same = same.sum(1)
    return ((n_same >= 2) & (n_same < labels.numel())).sum()


def branch_triplet(e: torch.Tensor, labels: torch.Tensor, margin: Optional[float], reduction: Reduction,
                   group: Optional[ProcessGroup], triplet_fn: TripletFn) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-rank branch_triplet on validated inputs: e [B, n, L], labels [n].

    `triplet_fn(e_all, labels_all, margin, "none")` computes the per-anchor terms of a whole batch
    (the fused op or the reference); this function gathers, keeps the local anchors and reduces with
    the convention of the module docstring.
    """
    _check_group(group)
    W, r = world_size(group), rank(group)
    n = e.size(1)
    _check_same_shapes(e, group)
    e_all = gather_batch(e, group, dim=1)
    y_all = gather_batch(labels, group, dim=0)
    self_terms, cross_terms = triplet_fn(e_all, y_all, margin, "none")
    local = slice(r * n, (r + 1) * n)
    self_terms, cross_terms = self_terms[:, local], cross_terms[:, :, local]
    if reduction == "none":
        return self_terms, cross_terms
    if reduction == "sum":
        return W * self_terms.sum(), W * cross_terms.sum()
    scale = W / _valid_anchor_count(y_all).clamp_min(1).to(self_terms.dtype)
    return self_terms.sum() * scale, cross_terms.sum() * scale
