"""Re-ID retrieval evaluation: feature extraction, cosine distance, single-query CMC and mAP.

The protocol is the Market-1501 single-query one that Re-ID papers (and the KSL paper, §4.1–4.2)
report: every query is ranked against the whole gallery, gallery images of the *same identity seen by
the same camera* are removed from that query's ranking (they are near-duplicates, not a
re-identification), and a query whose identity has no image left in the gallery is skipped. Rank-k
of the CMC curve is the fraction of (valid) queries whose first correct match is within the top k;
mAP is the mean over valid queries of the average precision of the full ranking.

`evaluate_reid` keeps the argument names and meaning of the evaluation functions Re-ID code has used
for years (distmat, q_pids, g_pids, q_camids, g_camids, max_rank), NumPy in and out, so it drops
into existing scripts.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import numpy as np
import torch

# An array argument: a NumPy array, a torch tensor or a sequence of numbers.
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Any]]

__all__ = ["evaluate_reid", "extract_features", "cosine_distance"]

# Queries are ranked in blocks of about this many (query, gallery) pairs, so the int64/float64
# temporaries of a block stay around 32 MB each; an MSMT17 argsort of the whole 11659 x 82161
# matrix at once would need 7.6 GB.
_EVAL_BLOCK_ELEMENTS = 1 << 22


def _as_numpy(x: object, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {x.shape}")
    return x


def evaluate_reid(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike,
                  max_rank: int = 50) -> Dict[str, object]:
    """Single-query CMC and mAP with the Market-1501 protocol.

    Args:
        distmat: [num_q, num_g] distances (smaller = more similar), NumPy or torch.
        q_pids, g_pids: identity labels of the queries [num_q] and gallery [num_g].
        q_camids, g_camids: camera ids of the queries and gallery.
        max_rank: length of the returned CMC curve.

    Returns:
        {"cmc": float array [max_rank] (cmc[k-1] is Rank-k), "mAP": float, "num_valid_queries": int}.

    For each query, gallery items with the same pid *and* the same camera are dropped; a query with
    no remaining correct match is skipped (not counted as a miss). Ties in distance are ranked by
    gallery index (stable sort), so results are deterministic. If fewer than `max_rank` gallery
    items remain for a query, its CMC is already 1 at its last rank and stays 1 to `max_rank`.

    Raises:
        ValueError: on mismatched shapes, or when no query has a valid match in the gallery.
    """
    distmat = _as_numpy(distmat, "distmat", 2)
    q_pids = _as_numpy(q_pids, "q_pids", 1)
    g_pids = _as_numpy(g_pids, "g_pids", 1)
    q_camids = _as_numpy(q_camids, "q_camids", 1)
    g_camids = _as_numpy(g_camids, "g_camids", 1)
    num_q, num_g = distmat.shape
    if q_pids.shape[0] != num_q or q_camids.shape[0] != num_q:
        raise ValueError(f"q_pids and q_camids must have num_q={num_q} entries (distmat is {distmat.shape}), "
                         f"got {q_pids.shape[0]} and {q_camids.shape[0]}")
    if g_pids.shape[0] != num_g or g_camids.shape[0] != num_g:
        raise ValueError(f"g_pids and g_camids must have num_g={num_g} entries (distmat is {distmat.shape}), "
                         f"got {g_pids.shape[0]} and {g_camids.shape[0]}")
    if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"evaluate_reid needs at least one query and one gallery item, distmat is {distmat.shape}")
    if np.isnan(distmat).any():
        raise ValueError("distmat contains NaN; the features or the distance computation are broken")
    if num_g < max_rank:
        warnings.warn(f"evaluate_reid: the gallery has only {num_g} items, less than max_rank={max_rank}; "
                      "ranks beyond the gallery size repeat the last value", stacklevel=2)

    cmc_hits = np.zeros(max_rank, dtype=np.int64)  # number of valid queries with first match at rank k
    ap_sum = 0.0
    num_valid = 0
    block = max(1, _EVAL_BLOCK_ELEMENTS // num_g)
    for start in range(0, num_q, block):
        stop = min(num_q, start + block)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        pid_sorted = g_pids[order]
        cam_sorted = g_camids[order]
        same_pid = pid_sorted == q_pids[start:stop, None]
        same_cam = cam_sorted == q_camids[start:stop, None]
        keep = ~(same_pid & same_cam)
        good = same_pid & keep  # correct matches that count
        num_good = good.sum(axis=1)
        valid = num_good > 0
        if not valid.any():
            continue
        keep, good, num_good = keep[valid], good[valid], num_good[valid]
        # 0-based rank of every gallery item among the kept ones of its query.
        kept_rank = np.cumsum(keep, axis=1) - 1
        # CMC: the rank of the first correct match.
        first = kept_rank[np.arange(good.shape[0]), np.argmax(good, axis=1)]
        cmc_hits += np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
        # AP = mean over correct matches of precision at their rank = (#correct so far) / (rank + 1).
        hits_so_far = np.cumsum(good, axis=1)
        precision = np.where(good, hits_so_far / np.maximum(kept_rank + 1.0, 1.0), 0.0)
        ap_sum += float((precision.sum(axis=1) / num_good).sum())
        num_valid += int(good.shape[0])

    if num_valid == 0:
        raise ValueError(f"evaluate_reid: none of the {num_q} queries has a correct match in the gallery "
                         "once same-identity same-camera items are removed; check that query and gallery "
                         "share identities and that camera ids are right")
    cmc = np.cumsum(cmc_hits).astype(np.float64) / num_valid
    return {"cmc": cmc, "mAP": ap_sum / num_valid, "num_valid_queries": num_valid}


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable[Any],
                     device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Main-branch embeddings of every image in `loader`.

    The model is put in eval mode (a plain backbone or an IsomorphicNet: both return the 512-D
    main-branch embedding there, the FC output before the BN neck, as the paper retrieves with) and
    restored to its previous mode afterwards.

    Returns (feats float32 [N, 512] on CPU, pids int64 [N], camids int64 [N]).
    """
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    try:
        for batch in loader:
            images, pid, camid = batch[0], batch[1], batch[2]
            out = model(images.to(device, non_blocking=True))
            if isinstance(out, (list, tuple)):  # tolerate models that return (logits, emb) in eval mode
                out = out[-1]
            feats.append(out.float().cpu())
            pids.append(torch.as_tensor(pid).cpu().numpy().astype(np.int64))
            camids.append(torch.as_tensor(camid).cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)


def cosine_distance(qf: ArrayLike, gf: ArrayLike) -> np.ndarray:
    """1 − cos(q, g) for every query/gallery pair: float32 NumPy array [num_q, num_g], in [0, 2]."""
    qf = torch.as_tensor(qf).float()
    gf = torch.as_tensor(gf).float()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be [num_q, D] and [num_g, D] with the same D, got "
                         f"{tuple(qf.shape)} and {tuple(gf.shape)}")
    qn = torch.nn.functional.normalize(qf, dim=1)
    gn = torch.nn.functional.normalize(gf, dim=1)
    return (1.0 - qn @ gn.t()).clamp_(min=0.0).numpy()
