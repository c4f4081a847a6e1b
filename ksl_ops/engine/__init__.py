"""Training engine for KSL: evaluation (CMC, mAP), k-reciprocal re-ranking, checkpoints, the trainer.

    from ksl_ops.engine import evaluate_reid, re_ranking, Trainer, TrainConfig, HookBase
    r = evaluate_reid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)  # {"cmc", "mAP"}
    d = re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)
"""
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, read_checkpoint, save_checkpoint
from .evaluation import cosine_distance, evaluate_reid, extract_features
from .rerank import re_ranking

if TYPE_CHECKING:  # loaded on first use by __getattr__ below; named here for the type checker
    from .config import LOSS_PRESETS, TrainConfig
    from .hooks import HookBase, default_hooks
    from .trainer import Trainer, evaluate_checkpoint, train

__all__ = [
    "evaluate_reid",
    "extract_features",
    "cosine_distance",
    "re_ranking",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "HookBase",
    "default_hooks",
    "LOSS_PRESETS",
    "train",
    "evaluate_checkpoint",
]


def __getattr__(name: str) -> Any:
    # The trainer pulls in the models, data and losses; load it only when asked for.
    if name in ("TrainConfig", "LOSS_PRESETS"):
        from . import config

        return getattr(config, name)
    if name in ("HookBase", "default_hooks"):
        from . import hooks

        return getattr(hooks, name)
    if name in ("Trainer", "train", "evaluate_checkpoint"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ksl_ops.engine' has no attribute {name!r}")
