"""KSL-P: knowledge constraints of dynamic probability (paper §3.2, eq. 3-6).

logits: [B, N, K]. p^b = softmax(z^b / T). Terms carry the Hinton factor T².
"""
import math

import torch

from ._reduce import reduce_terms


def kl_divergence(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = Σ_k q_k (log q_k − log p_k) over the last dim, from log-probabilities.

    A class with q_k = 0 contributes q_k · (finite) = 0, which is the 0·log 0 = 0 convention.
    """
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def ksl_pp(logits: torch.Tensor, temperature: float = 1.0, detach_target: bool = True,
           reduction: str = "mean") -> torch.Tensor:
    """Eq. 4, densely pairwise distillation: (1/N) Σ_n Σ_{u≠v} KL(p^u_n || p^v_n).

    Branch v imitates branch u, so p^u is the target (detached when `detach_target`).
    `none` returns [B, B, N] with KL(p^u_n || p^v_n) at [u, v, n] and a zero diagonal.
    """
    B, N, _ = logits.shape
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    log_target = log_p.detach() if detach_target else log_p
    terms = logits.new_zeros(B, B, N)
    for u in range(B):
        for v in range(B):
            if u != v:
                terms[u, v] = kl_divergence(log_target[u], log_p[v])
    return reduce_terms(terms * temperature**2, reduction, N)


def average_branch_log_prob(log_p: torch.Tensor, b: int) -> torch.Tensor:
    """Eq. 6 in log space: log a^b = log((1/(B−1)) Σ_{j≠b} p^j), via log-sum-exp so that it stays
    finite where every p^j underflows."""
    B = log_p.shape[0]
    others = torch.cat([log_p[:b], log_p[b + 1:]])
    return torch.logsumexp(others, dim=0) - math.log(B - 1)


def ksl_pa(logits: torch.Tensor, temperature: float = 1.0, detach_target: bool = True,
           reduction: str = "mean") -> torch.Tensor:
    """Eq. 5, distillation from the virtual average branch: (1/N) Σ_n Σ_b KL(a^b_n || p^b_n).

    a^b (eq. 6) is the target (detached when `detach_target`). `none` returns [B, N].
    """
    B, N, _ = logits.shape
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    log_p_for_target = log_p.detach() if detach_target else log_p
    terms = torch.stack([
        kl_divergence(average_branch_log_prob(log_p_for_target, b), log_p[b]) for b in range(B)
    ])
    return reduce_terms(terms * temperature**2, reduction, N)


def prob_consensus(logits: torch.Tensor, temperature: float = 1.0, detach_target: bool = True,
                   reduction: str = "mean"):
    """Eq. 3: (L_ksl_pp, L_ksl_pa)."""
    return (ksl_pp(logits, temperature, detach_target, reduction),
            ksl_pa(logits, temperature, detach_target, reduction))
