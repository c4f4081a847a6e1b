"""What a KSL run looks like from the inside, per step and per epoch.

The failure this exists for: with the paper's recipe taken literally, the consensus terms can win
against cross-entropy by shrinking or collapsing the embeddings, and the symptom (CE climbing back to
its uniform value, head BN variances at BN's eps, every triplet at exactly its margin) only shows if
these quantities are logged. They are computed from detached network outputs, under no_grad, and
averaged over the epoch next to the loss parts.

Per step (:func:`step_diagnostics`):
  ``ce/b{i}``              cross-entropy of branch i (label smoothing as in the loss)
  ``emb_norm/b{i}``        mean L2 norm of branch i's embeddings
  ``triplet_active/self``  share of valid anchors whose per-branch triplet term is > 0
  ``triplet_active/cross`` the same for the KSL-H (cross-branch) terms
Per epoch (:func:`head_bn_variance`):
  ``bn_var/b{i}``          mean running variance of branch i's head BN (the 512-D neck)
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

__all__ = ["step_diagnostics", "head_bn_variance"]


@torch.no_grad()
def step_diagnostics(logits: List[torch.Tensor], embeddings: List[torch.Tensor], labels: torch.Tensor,
                     criterion, epoch: int) -> Dict[str, torch.Tensor]:
    """Per-branch CE and embedding norm, and the share of active triplet anchors, as 0-d tensors."""
    out: Dict[str, torch.Tensor] = {}
    for i, (z, e) in enumerate(zip(logits, embeddings)):
        out[f"ce/b{i}"] = F.cross_entropy(z.detach().float(), labels, label_smoothing=criterion.label_smoothing)
        out[f"emb_norm/b{i}"] = e.detach().float().norm(dim=1).mean()
    if criterion.triplet_active(epoch):
        from ..distributed import _valid_anchor_count
        from ..functional import branch_triplet

        e = torch.stack([t.detach() for t in embeddings])
        if e.dtype in (torch.float16, torch.bfloat16):
            e = e.float()  # as KSLLoss sees them under autocast (--amp)
        if criterion.normalize_triplet:
            e = F.normalize(e, dim=-1)
        if e.size(0) == 1:
            e = e.expand(2, -1, -1)
        self_t, cross_t = branch_triplet(e, labels, criterion.margin, reduction="none", backend=criterion.backend)
        # Invalid anchors' terms are 0 (docs/design.md §3.3), so counting terms > 0 needs no mask, only the count.
        n_valid = _valid_anchor_count(labels).clamp_min(1).to(self_t.dtype)
        B = e.size(0)
        out["triplet_active/self"] = (self_t > 0).sum().to(self_t.dtype) / (B * n_valid)
        if B > 1 and len(embeddings) > 1:
            off = ~torch.eye(B, dtype=torch.bool, device=e.device)
            out["triplet_active/cross"] = (cross_t > 0)[off].sum().to(self_t.dtype) / (B * (B - 1) * n_valid)
    return out


@torch.no_grad()
def head_bn_variance(model: torch.nn.Module) -> Dict[str, float]:
    """Mean running variance of the head BN of every branch (main branch first)."""
    heads = []
    base = getattr(model, "base", model)
    if hasattr(base, "head"):
        heads.append(base.head)
    for branch in getattr(model, "branches", []):
        heads.append(branch.head)
    return {f"bn_var/b{i}": float(h.bn.running_var.mean()) for i, h in enumerate(heads) if hasattr(h, "bn")}
