"""Training curves as PNG (matplotlib, Agg backend: works headless, never opens a window)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List


def _pyplot():
    import matplotlib

    # Force the file-only backend before pyplot is imported anywhere in this process.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: List[Dict[str, Any]], path, title: str = "") -> Path:
    """Loss parts, learning rate and evaluation R1/mAP per epoch, one PNG with three panels.

    `history` is the list of per-epoch records of metrics.json ("epoch", "lr", "loss": {part: value},
    optional "eval": {"R1", "mAP", ...}).
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
