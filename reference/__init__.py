"""Pure-PyTorch reference of every KSL loss: the executable spec the fused ops are tested against.

One function per equation of the paper (Knowledge-Supervised Learning, ACM MM'21), written to be read
next to it and exact in float64. Installed as ``ksl_ops.reference``; ``backend="reference"`` runs it.
"""
from .ksl_e import embedding_consensus, ksl_ea, ksl_ep
from .ksl_p import kl_divergence, ksl_pa, ksl_pp, prob_consensus
from .triplet import batch_hard_triplet, branch_distance, branch_triplet

__all__ = [
    "kl_divergence",
    "ksl_pp",
    "ksl_pa",
    "prob_consensus",
    "ksl_ep",
    "ksl_ea",
    "embedding_consensus",
    "branch_distance",
    "batch_hard_triplet",
    "branch_triplet",
]
