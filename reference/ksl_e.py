"""KSL-E: knowledge constraints of embedding distance (paper §3.3, eq. 7-10).

emb: [B, N, L]. Unsquared Euclidean norms, symmetric, no detach.
"""
import torch

from ._reduce import reduce_terms


def ksl_ep(emb: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 8: (1/N) Σ_n Σ_{u<v} ||e^u_n − e^v_n||₂. `none` returns [B, B, N], filled for u < v."""
    B, N, _ = emb.shape
    terms = emb.new_zeros(B, B, N)
    for u in range(B):
        for v in range(u + 1, B):
            terms[u, v] = torch.linalg.vector_norm(emb[u] - emb[v], dim=-1)
    return reduce_terms(terms, reduction, N)


def ksl_ea(emb: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 9-10: (1/N) Σ_n Σ_b ||m^b_n − e^b_n||₂ with m^b = (1/(B−1)) Σ_{j≠b} e^j. `none`: [B, N]."""
    B, N, _ = emb.shape
    terms = []
    for b in range(B):
        m_b = (emb.sum(0) - emb[b]) / (B - 1)
        terms.append(torch.linalg.vector_norm(m_b - emb[b], dim=-1))
    return reduce_terms(torch.stack(terms), reduction, N)


def embedding_consensus(emb: torch.Tensor, reduction: str = "mean"):
    """Eq. 7: (L_ksl_ep, L_ksl_ea)."""
    return ksl_ep(emb, reduction), ksl_ea(emb, reduction)
