"""Batch-hard triplets within a branch (the per-branch triplet of L_aux_t, eq. 2) and across branches
(KSL-H, hard sample mutual mining, eq. 11).

emb: [B, N, L], labels: int64 [N] shared by every branch. For branches (u, v) the anchor m comes from
branch u and its positives/negatives from branch v.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._reduce import reduce_terms

DIST_EPS = 1e-12  # d = sqrt(max(squared distance, eps)): finite gradient at coincident points


def branch_distance(anchors: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """[N, M] matrix of d(a_m, o_n) = sqrt(max(Σ_l (a_ml − o_nl)², 1e-12)), from exact differences."""
    squared = (anchors[:, None, :] - others[None, :, :]).pow(2).sum(-1)
    return squared.clamp_min(DIST_EPS).sqrt()


def valid_anchors(labels: torch.Tensor) -> torch.Tensor:
    """An anchor needs another sample of its identity and a sample of another identity."""
    same = labels[:, None] == labels[None, :]
    n_same = same.sum(1)
    return (n_same >= 2) & (n_same < labels.numel())


def batch_hard_triplet(anchors: torch.Tensor, others: torch.Tensor, labels: torch.Tensor,
                       margin: Optional[float] = 0.3) -> torch.Tensor:
    """Per-anchor batch-hard term [N]: [d⁺ − d⁻ + margin]₊ (or log(1 + exp(d⁺ − d⁻)) for margin=None),
    d⁺ = max over n ≠ m of the same identity, d⁻ = min over other identities; 0 for an invalid anchor.

    torch.max/min pick the first extreme index on ties, which is the kernels' tie rule (lowest n).
    """
    N = labels.numel()
    d = branch_distance(anchors, others)
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(N, dtype=torch.bool, device=labels.device)
    d_pos = torch.where(same & not_self, d, float("-inf")).max(dim=1).values
    d_neg = torch.where(~same, d, float("inf")).min(dim=1).values
    valid = valid_anchors(labels)
    # Substitute 0 for the ±inf of invalid anchors before the loss so that no inf reaches autograd.
    gap = torch.where(valid, d_pos - d_neg, torch.zeros_like(d_pos))
    term = F.softplus(gap) if margin is None else torch.relu(gap + margin)
    return torch.where(valid, term, torch.zeros_like(term))


def branch_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: Optional[float] = 0.3,
                   reduction: str = "mean"):
    """(L_aux_t, L_ksl_h): Σ_b mean_m term(b, b, m) and Σ_{u≠v} mean_m term(u, v, m).

    `mean` divides by the number of valid anchors (the loss is 0 when there is none); `none` returns
    `self` [B, N] and `cross` [B, B, N] with a zero diagonal.
    """
    B, N, _ = emb.shape
    self_terms = torch.stack([batch_hard_triplet(emb[b], emb[b], labels, margin) for b in range(B)])
    cross_terms = emb.new_zeros(B, B, N)
    for u in range(B):
        for v in range(B):
            if u != v:
                cross_terms[u, v] = batch_hard_triplet(emb[u], emb[v], labels, margin)
    n_valid = valid_anchors(labels).sum().clamp_min(1).to(emb.dtype)
    return (reduce_terms(self_terms, reduction, n_valid),
            reduce_terms(cross_terms, reduction, n_valid))
