"""Training curves as PNG (matplotlib, Agg backend: works headless, never opens a window)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

from .._typing import StrPath


def _pyplot() -> Any:
    import matplotlib

    # Force the file-only backend before pyplot is imported anywhere in this process.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_diag(ax: Any, history: List[Dict[str, Any]], prefix: str, ylabel: str, title: str,
               log: bool = False) -> List[str]:
    keys = sorted({k for h in history for k in h.get("diag", {}) if k.startswith(prefix)})
    for key in keys:
        pts = [(h["epoch"], h["diag"][key]) for h in history if key in h.get("diag", {})]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=key[len(prefix):])
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log and keys and all(h["diag"][k] > 0 for h in history for k in keys if k in h.get("diag", {})):
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=8)
    return keys


def plot_training_curves(history: List[Dict[str, Any]], path: StrPath, title: str = "",
                         num_classes: int = 0) -> Path:
    """Loss parts, learning rate and evaluation R1/mAP per epoch, plus (when the records have
    "diag", see diagnostics.py) per-branch CE against its uniform value log K, embedding norms, head
    BN running variances and the share of active triplet anchors: one PNG.

    `history` is the list of per-epoch records of metrics.json ("epoch", "lr", "loss": {part: value},
    optional "eval": {"R1", "mAP", ...}, optional "diag": {name: value}).
    """
    import math

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with_diag = any(h.get("diag") for h in history)
    fig, grid = plt.subplots(2 if with_diag else 1, 3, figsize=(15, 8 if with_diag else 4), squeeze=False)
    axes = grid[0]
    epochs = [h["epoch"] for h in history]

    ax = axes[0]
    parts = sorted({k for h in history for k in h.get("loss", {})})
    for part in parts:
        xs = [h["epoch"] for h in history if part in h.get("loss", {})]
        ys = [h["loss"][part] for h in history if part in h.get("loss", {})]
        ax.plot(xs, ys, marker="o", ms=3, label=part, lw=2 if part == "total" else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (epoch mean)")
    if parts and all(h["loss"].get(p, 1.0) > 0 for h in history for p in h.get("loss", {})):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("loss parts")

    ax = axes[1]
    ax.plot(epochs, [h["lr"] for h in history], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")

    ax = axes[2]
    evals = [h for h in history if h.get("eval")]
    for key in ("R1", "R5", "mAP"):
        if evals and key in evals[0]["eval"]:
            ax.plot([h["epoch"] for h in evals], [h["eval"][key] for h in evals], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_title("evaluation (main branch)")
    if evals:
        ax.legend(fontsize=8)
    if with_diag:
        ax = grid[1][0]
        has_ce = _plot_diag(ax, history, "ce/", "cross-entropy", "CE per branch (dashed: uniform, log K)")
        if has_ce and num_classes > 1:
            ax.axhline(math.log(num_classes), color="grey", ls="--", lw=1)
        _plot_diag(grid[1][1], history, "emb_norm/", "mean L2 norm", "embedding norm per branch", log=True)
        ax = grid[1][2]
        _plot_diag(ax, history, "triplet_active/", "share of valid anchors", "active triplets (loss > 0)")
        ax.set_ylim(-0.02, 1.02)
        bn = sorted({k for h in history for k in h.get("diag", {}) if k.startswith("bn_var/")})
        if bn:  # BN variance on a twin axis: it goes to BN's eps (1e-5) when embeddings collapse
            twin = ax.twinx()
            for key in bn:
                pts = [(h["epoch"], h["diag"][key]) for h in history if key in h.get("diag", {})]
                twin.plot([x for x, _ in pts], [y for _, y in pts], ls=":", label=key)
            twin.set_yscale("log")
            twin.set_ylabel("head BN running variance (dotted)")
            twin.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
