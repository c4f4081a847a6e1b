"""What a user would write instead of the fused ops: the vectorised eager formulations.

These are the baselines of bench/kernels.py's "vectorised" and "vec-compiled" columns (the readable
reference in reference/ is slow by design, so beating it says little). Each computes the same loss as
the op with the same defaults (mean reduction, detach_target=True, margin 0.3) the way fast-reid and
pytorch-metric-learning do it:

- prob_consensus: log-softmax once per branch, then KL over all branch pairs by broadcasting
  [B, 1, N, K] against [1, B, N, K];
- embedding_consensus: `torch.linalg.vector_norm` of the pair differences and of the differences to
  the other branches' average;
- branch_triplet: one GEMM for all B·N × B·N squared distances (|a|² + |b|² − 2 a·b, `addmm`), then
  masked max / min per anchor and branch pair (batch-hard), as fast-reid's `hard_example_mining`.

`pml_triplet` is pytorch-metric-learning's TripletMarginLoss with BatchHardMiner, per branch and
across branches through `ref_emb`; it needs the `bench` extra (`pip install -e ".[bench]"`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prob_consensus(z: torch.Tensor, temperature: float = 1.0):
    """(pp, pa) with detach_target=True, mean over samples, summed over branch pairs, times T²."""
    B, N = z.shape[0], z.shape[1]
    logp = F.log_softmax(z.float() / temperature, dim=-1)  # [B, N, K]
    p_t = logp.detach().exp()
    logp_t = logp.detach()
    # KL(p^u || p^v) for every ordered pair: sum_k p^u (log p^u − log p^v); the diagonal is 0.
    pp = (p_t.unsqueeze(1) * (logp_t.unsqueeze(1) - logp.unsqueeze(0))).sum(-1)  # [u, v, N]
    a = (p_t.sum(0, keepdim=True) - p_t) / (B - 1)  # average of the other branches
    pa = torch.xlogy(a, a) - a * logp  # [B, N, K]
    t2 = temperature * temperature
    return pp.sum() * (t2 / N), pa.sum() * (t2 / N)


def embedding_consensus(e: torch.Tensor):
    """(ep, ea), mean over samples."""
    B, N = e.shape[0], e.shape[1]
    iu, iv = torch.triu_indices(B, B, 1, device=e.device)
    ep = torch.linalg.vector_norm(e[iu] - e[iv], dim=-1).sum() / N
    m = (e.sum(0, keepdim=True) - e) / (B - 1)
    ea = torch.linalg.vector_norm(m - e, dim=-1).sum() / N
    return ep, ea


def branch_triplet(e: torch.Tensor, labels: torch.Tensor, margin: float = 0.3):
    """(aux_t, ksl_h): batch-hard triplets within (u = v) and across (u ≠ v) branches, mean over
    valid anchors, summed over branch pairs."""
    B, N, L = e.shape
    x = e.reshape(B * N, L)
    sq = (x * x).sum(1)
    d2 = torch.addmm(sq.unsqueeze(1) + sq.unsqueeze(0), x, x.t(), beta=1, alpha=-2)
    d = d2.clamp_min(1e-12).sqrt().view(B, N, B, N).transpose(1, 2)  # [u, v, m, n]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    pos = same & ~torch.eye(N, dtype=torch.bool, device=e.device)
    neg = ~same
    d_pos = d.masked_fill(~pos, float("-inf")).amax(-1)
    d_neg = d.masked_fill(~neg, float("inf")).amin(-1)
    valid = pos.any(1) & neg.any(1)
    terms = torch.where(valid, F.relu(d_pos - d_neg + margin), torch.zeros((), device=e.device))  # [u, v, N]
    count = valid.sum().clamp_min(1)
    per_pair = terms.sum(-1) / count  # [u, v]
    aux = per_pair.diagonal().sum()
    return aux, per_pair.sum() - aux


def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def pml_triplet(margin: float = 0.3):
    """pytorch-metric-learning's batch-hard triplet loss over B branches: per branch (aux_t) and for
    every ordered pair of branches through ref_emb (ksl_h). Unnormalised Euclidean distances, as the
    op. (PML averages over the triplets with a positive loss, so its value differs from the op's
    mean over valid anchors; the work is the same.)"""
    from pytorch_metric_learning import distances, losses, miners

    dist = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
    loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist)
    miner = miners.BatchHardMiner(distance=dist)

    def run(e: torch.Tensor, labels: torch.Tensor):
        B = e.shape[0]
        aux = e.new_zeros(())
        cross = e.new_zeros(())
        for u in range(B):
            for v in range(B):
                if u == v:
                    aux = aux + loss_fn(e[u], labels, miner(e[u], labels))
                else:
                    tuples = miner(e[u], labels, e[v], labels)
                    cross = cross + loss_fn(e[u], labels, tuples, ref_emb=e[v], ref_labels=labels)
        return aux, cross

    return run
