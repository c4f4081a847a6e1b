"""ksl-ops: fused loss kernels for Knowledge-Supervised Learning (KSL) in person re-identification.

    import ksl_ops
    pp, pa = ksl_ops.prob_consensus(logits)               # KSL-P, eq. 3-6
    ep, ea = ksl_ops.embedding_consensus(embeddings)      # KSL-E, eq. 7-10
    aux_t, ksl_h = ksl_ops.branch_triplet(embeddings, labels)  # eq. 2 triplets and KSL-H, eq. 11
    crit = ksl_ops.KSLLoss(num_classes)                   # eq. 1, recipe "ksl-ops" (the one `ksl train` uses)
    crit = ksl_ops.KSLLoss(num_classes, recipe="paper")   # eq. 1 fed as the paper's text reads
    tri = ksl_ops.BatchHardTripletLoss(margin=0.3)        # torchreid's TripletLoss call: tri(features, pids)
    # module forms of the ops: ProbConsensusLoss, EmbeddingConsensusLoss, BranchTripletLoss
"""
from typing import TYPE_CHECKING, Any

from . import _ext
from ._version import __version__
from .functional import branch_triplet, embedding_consensus, prob_consensus
from .losses import (
    BatchHardTripletLoss,
    BranchTripletLoss,
    EmbeddingConsensusLoss,
    KSLLoss,
    KSLOutput,
    ProbConsensusLoss,
)
from .recipes import RECIPES

if TYPE_CHECKING:  # loaded on first use by __getattr__ below; named here for the type checker
    from . import data, engine, models

__all__ = [
    "__version__",
    "backend",
    "prob_consensus",
    "embedding_consensus",
    "branch_triplet",
    "KSLLoss",
    "KSLOutput",
    "RECIPES",
    "BatchHardTripletLoss",
    "ProbConsensusLoss",
    "EmbeddingConsensusLoss",
    "BranchTripletLoss",
    "models",
    "data",
    "engine",
]


def backend() -> str:
    """What is compiled in: "cpu" or "cpu+cuda" ("none" if the extension failed to load)."""
    if not _ext.available():
        return "none"
    return "cpu+cuda" if _ext.has_cuda_kernels() else "cpu"


def __getattr__(name: str) -> Any:
    # The training pieces import heavier modules; load them on first use.
    if name in ("models", "data", "engine"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ksl_ops' has no attribute {name!r}")
