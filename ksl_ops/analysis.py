"""The paper's analyses of trained models as tools (KSL, ACM MM'21, §4.6 and §4.8).

Per-block weight distributions (Figure 5)::

    blocks = block_conv_weights(model)                 # {"stem": w, "conv2_1": w, ..., "head": w}
    report = weight_report({"AUX": m1, "KSL": m2}, threshold=1e-3)
    plot_weight_distributions({"AUX": blocks1, "KSL": blocks2}, "weights.png", threshold=1e-3)

t-SNE of embeddings under test-time augmentation (Figure 7)::

    images, pids = augmented_test_images(dataset, 64, 32, identities=20, draws=2, seed=0)
    feats = embed(model, images)
    xy = tsne_2d(feats, seed=0)                        # needs scikit-learn: pip install "ksl-ops[analysis]"
    plot_tsne([("KSL", xy, pids, separation(feats, pids))], "tsne.png")

The command line is ``ksl analyze weights`` / ``ksl analyze tsne`` (``ksl analyze --help``). Both work
on ``ksl train`` checkpoints and look at the main branch only, the network that is kept for inference.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._typing import StrPath

if TYPE_CHECKING:
    from .data import ReIDDataset

__all__ = ["block_conv_weights", "weight_report", "plot_weight_distributions", "augmented_test_images",
           "embed", "tsne_2d", "separation", "plot_tsne", "analyze_weights", "analyze_tsne", "DEAD_THRESHOLD"]

# |w| below this is counted as a "dead" weight. The paper does not state its threshold (Figure 5 shows a
# spike at zero); 1e-3 is about 2% of the smallest He-initialisation standard deviation in these
# networks (sqrt(2 / fan_in), fan_in <= 4608), so a weight below it has been driven there by training.
DEAD_THRESHOLD = 1e-3


def _main_network(model: nn.Module) -> Any:
    base = getattr(model, "base", model)  # IsomorphicNet: the main branch (the network kept for inference)
    for attr in ("stem", "stages", "head"):
        if not hasattr(base, attr):
            raise TypeError(f"expected a ksl_ops backbone (see ksl_ops.models.build_backbone) or an IsomorphicNet, "
                            f"got {type(model).__name__} without .{attr}")
    return base


def _conv_weights(module: nn.Module) -> Optional[torch.Tensor]:
    ws = [m.weight.detach().reshape(-1) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return torch.cat(ws).float().cpu() if ws else None


def block_conv_weights(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Every convolution weight of the main network, flattened and grouped by block, in network order.

    Blocks are named as in the paper's Figure 5: ``stem``, then ``<stage>_<i>`` for the i-th (1-based)
    module of each stage (``conv2_1``, ``conv2_2``, ...; a stage that is not a sequence is one block,
    named after the stage), then ``head``. Blocks without a convolution are left out.
    """
    net = _main_network(model)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    parts: List[Tuple[str, nn.Module]] = [("stem", net.stem)]
    for name, stage in net.stages.items():
        if isinstance(stage, nn.Sequential):
            parts += [(f"{name}_{i + 1}", block) for i, block in enumerate(stage)]
        else:
            parts.append((name, stage))
    parts.append(("head", net.head))
    for name, module in parts:
        w = _conv_weights(module)
        if w is not None:
            out[name] = w
    return out


def weight_report(blocks_by_model: Mapping[str, Mapping[str, torch.Tensor]],
                  threshold: float = DEAD_THRESHOLD) -> Dict[str, Dict]:
    """Per model and block: number of weights, their standard deviation and the share with |w| < threshold
    (the "dead" weights), plus the share over all blocks."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    report: Dict[str, Dict] = {}
    for label, blocks in blocks_by_model.items():
        per = {name: {"n": int(w.numel()), "std": float(w.std()) if w.numel() > 1 else 0.0,
                      "dead_share": float((w.abs() < threshold).float().mean())} for name, w in blocks.items()}
        total = sum(b["n"] for b in per.values())
        dead = sum(b["dead_share"] * b["n"] for b in per.values())
        report[label] = {"blocks": per, "dead_share": dead / max(total, 1), "n": total}
    return report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: StrPath) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _subsample(w: torch.Tensor, n: int = 1_000_000) -> torch.Tensor:
    return w[:: max(1, w.numel() // n)]  # torch.quantile takes at most 16M values


def plot_weight_distributions(blocks_by_model: Mapping[str, Mapping[str, torch.Tensor]], path: StrPath,
                              threshold: float = DEAD_THRESHOLD, bins: int = 121, title: str = "") -> Path:
    """One panel per block, each model's weight histogram overlaid (log counts, so a spike at zero and
    the tails both show); the legend gives each model's share of |w| < threshold in that block."""
    plt = _pyplot()
    labels = list(blocks_by_model)
    names = list(dict.fromkeys(n for blocks in blocks_by_model.values() for n in blocks))
    report = weight_report(blocks_by_model, threshold)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        present = [lab for lab in labels if name in blocks_by_model[lab]]
        # Range: the 0.5-99.5 percentiles of all models' weights in this block, symmetric about 0.
        lim = max(float(torch.quantile(_subsample(blocks_by_model[lab][name].abs()), 0.995)) for lab in present)
        edges = np.linspace(-lim, lim, bins + 1)
        for i, lab in enumerate(present):
            w = blocks_by_model[lab][name].numpy()  # the few beyond the range are left out, not piled at its ends
            share = 100 * report[lab]["blocks"][name]["dead_share"]
            ax.hist(w, bins=edges, histtype="step", color=colors[i % len(colors)], linewidth=1.1,
                    label=f"{lab}: {share:.1f}% dead")
        ax.axvspan(-threshold, threshold, color="0.85", zorder=0)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle((title + "\n" if title else "") + f"convolution weights per block (main branch); "
                 f"grey band and 'dead': |w| < {threshold:g}", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# t-SNE under augmentation (Figure 7)
# ---------------------------------------------------------------------------------------------

def tsne_transform(height: int, width: int, generator: torch.Generator,
                   padding: Optional[int] = None) -> Callable[[Any], torch.Tensor]:
    """The test-time augmentation of Figure 7: random flip, pad-and-crop, patch and erasing, each drawn
    from ``generator``; p = 0.5 each, as in training."""
    from .data.transforms import (
        Compose,
        Normalize,
        Pad,
        RandomCrop,
        RandomErasing,
        RandomHorizontalFlip,
        RandomPatch,
        Resize,
        ToTensor,
        crop_padding,
    )

    pad = crop_padding(height) if padding is None else padding
    return Compose([ToTensor(), Resize(height, width), RandomHorizontalFlip(0.5, generator=generator),
                    Pad(pad), RandomCrop(height, width, generator=generator), Normalize(),
                    RandomPatch(0.5, min_pool=1, generator=generator), RandomErasing(0.5, generator=generator)])


def augmented_test_images(dataset: ReIDDataset, height: int, width: int, identities: int = 20, draws: int = 2,
                          seed: int = 0, max_images_per_id: Optional[int] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """``identities`` test identities drawn at random (query ∪ gallery), each of their images augmented
    ``draws`` times. Returns (images [M, 3, H, W], identity of each image [M]). The same seed gives the
    same identities, images and augmentations, so two models can be compared on identical inputs."""
    from PIL import Image

    items = list(dataset.query) + list(dataset.gallery)
    pids = sorted({pid for _, pid, _ in items if pid >= 0})
    if not 1 <= identities <= len(pids):
        raise ValueError(f"identities must be between 1 and the {len(pids)} test identities, got {identities}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    g = torch.Generator().manual_seed(int(seed))
    chosen = [pids[i] for i in torch.randperm(len(pids), generator=g)[:identities].tolist()]
    picked = []
    for pid in chosen:
        own = [path for path, p, _ in items if p == pid]
        picked += [(path, pid) for path in own[:max_images_per_id]]
    # Interleave the identities so the patch pool (RandomPatch) holds other people's content.
    order = torch.randperm(len(picked), generator=g).tolist()
    tf = tsne_transform(height, width, g)
    images, labels = [], []
    for _ in range(draws):
        for i in order:
            path, pid = picked[i]
            with Image.open(path) as im:
                images.append(tf(im.convert("RGB")))
            labels.append(pid)
    return torch.stack(images), np.asarray(labels)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Main-branch embeddings (eval mode, as at inference), L2-normalised, float32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        feats = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def separation(features: torch.Tensor, pids: Union[np.ndarray, Sequence[int]]) -> Dict[str, float]:
    """How well identities stay apart under the augmentation, in the embedding space itself (t-SNE's
    picture is qualitative): the mean cosine distance within an identity, across identities, their
    ratio (lower = tighter identities), and the leave-one-out 1-NN identity accuracy."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    y = torch.as_tensor(np.asarray(pids))
    d = 1.0 - f @ f.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    intra = float(d[same & ~eye].mean()) if (same & ~eye).any() else float("nan")
    inter = float(d[~same].mean()) if (~same).any() else float("nan")
    nn_idx = d.masked_fill(eye, float("inf")).argmin(1)
    return {"intra": intra, "inter": inter, "ratio": intra / inter if inter else float("nan"),
            "nn_accuracy": float((y[nn_idx] == y).double().mean())}


def tsne_2d(features: torch.Tensor, seed: int = 0, perplexity: Optional[float] = None) -> np.ndarray:
    """2-D t-SNE of the (L2-normalised) features with scikit-learn's TSNE (cosine metric, PCA start)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ImportError("the t-SNE analysis needs scikit-learn: pip install \"ksl-ops[analysis]\" "
                          "(or pip install scikit-learn)") from exc
    x = features.double().numpy()
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perp = min(30.0, (n - 1) / 3.0) if perplexity is None else float(perplexity)
    return TSNE(n_components=2, perplexity=perp, metric="cosine", init="pca", random_state=int(seed)).fit_transform(x)


def plot_tsne(panels: Sequence[Tuple[str, np.ndarray, np.ndarray, Optional[Dict[str, float]]]], path: StrPath,
              title: str = "") -> Path:
    """Side-by-side scatter plots, one per (label, xy, pids, separation stats), coloured by identity
    (the same identity has the same colour in every panel)."""
    plt = _pyplot()
    all_ids = sorted({int(p) for _, _, pids, _ in panels for p in pids})
    cmap = plt.get_cmap("tab20" if len(all_ids) <= 20 else "hsv", max(len(all_ids), 1))
    color_of = {pid: cmap(i) for i, pid in enumerate(all_ids)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for ax, (label, xy, pids, stats) in zip(axes[0], panels):
        ax.scatter(xy[:, 0], xy[:, 1], c=[color_of[int(p)] for p in pids], s=9, linewidths=0)
        sub = ""
        if stats:
            sub = (f"\nintra/inter cosine distance {stats['ratio']:.2f}, "
                   f"1-NN identity acc. {100 * stats['nn_accuracy']:.0f}%")
        ax.set_title(label + sub, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, 60 * len(panels)), fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# from checkpoints (what `ksl analyze` runs)
# ---------------------------------------------------------------------------------------------

def _labels_for(checkpoints: Sequence, labels: Optional[Sequence[str]]) -> List[str]:
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    if labels is None:
        # <run folder>/last.ckpt: the run folder's name says what it is
        return [Path(c).parent.name or str(c) for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints; give one label per checkpoint")
    return list(labels)


def analyze_weights(checkpoints: Sequence[StrPath], out: StrPath, labels: Optional[Sequence[str]] = None,
                    threshold: float = DEAD_THRESHOLD, with_init: bool = False,
                    log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Figure 5 for ``ksl train`` checkpoints: writes the histogram PNG ``out`` and returns
    :func:`weight_report` (also written next to it as JSON by the command line). ``with_init`` adds the
    untrained network of the first checkpoint's config and seed, as a reference: a Gaussian start already
    has some weights below any threshold, and what training adds is the difference."""
    from .engine.trainer import _seed_everything, build_model, load_trained_model

    labels = _labels_for(checkpoints, labels)
    blocks = {}
    for i, (lab, ckpt) in enumerate(zip(labels, checkpoints)):
        model, cfg, _ = load_trained_model(ckpt, "cpu", log=log)
        if with_init and i == 0:
            _seed_everything(cfg.seed)  # as the trainer does before building the network
            blocks[f"init (seed {cfg.seed})"] = block_conv_weights(build_model(cfg, model.num_classes))
        blocks[lab] = block_conv_weights(model)
    report = weight_report(blocks, threshold)
    plot_weight_distributions(blocks, out, threshold)
    return {"threshold": threshold, "checkpoints": dict(zip(labels, map(str, checkpoints))), "models": report}


def analyze_tsne(checkpoints: Sequence[StrPath], out: StrPath, labels: Optional[Sequence[str]] = None,
                 identities: int = 20, draws: int = 2, seed: int = 0, data_root: Optional[str] = None,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Figure 7 for ``ksl train`` checkpoints: the same augmented test images (same identities, same
    draws) through each model, t-SNE of each, side by side in ``out``; returns the separation stats."""
    from .engine.trainer import load_dataset, load_trained_model, use_data_root

    labels = _labels_for(checkpoints, labels)
    panels, stats = [], {}
    for lab, ckpt in zip(labels, checkpoints):
        model, cfg, _ = load_trained_model(ckpt, "cpu", log=log)
        use_data_root(cfg, data_root, log)  # the checkpoint's root only where nothing is written into it
        cfg.val_ids = 0  # the test identities, whatever split the run was evaluated on
        ds = load_dataset(cfg, log=log, check=("query", "gallery"), when="the analysis")
        images, pids = augmented_test_images(ds, cfg.height, cfg.width, identities, draws, seed)
        feats = embed(model, images)
        st = separation(feats, pids)
        panels.append((lab, tsne_2d(feats, seed), pids, st))
        stats[lab] = dict(st, checkpoint=str(ckpt), points=int(len(pids)))
        log(f"{lab}: {len(pids)} augmented images of {identities} identities; intra/inter cosine distance "
            f"{st['ratio']:.3f}, 1-NN identity accuracy {100 * st['nn_accuracy']:.1f}%")
    plot_tsne(panels, out, title=f"t-SNE of main-branch embeddings: {identities} random test identities, every "
                                 f"image augmented {draws}x (flip, crop, patch, erasing), seed {seed}")
    return {"identities": identities, "draws": draws, "seed": seed, "models": stats}
