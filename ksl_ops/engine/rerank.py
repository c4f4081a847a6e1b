"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), memory-safe for MSMT17-sized galleries.

The method, on the n = q + g images (queries and gallery together):

1. d(i, j): the given distances, squared and divided by the largest squared distance of row i.
2. N(i, k): the k nearest images of i (i itself first). R(i, k) = {j ∈ N(i, k) : i ∈ N(j, k)}, the
   k-reciprocal neighbours. The expanded set R*(i) adds, for each c ∈ R(i, k1), the set
   R(c, round(k1/2)) when at least 2/3 of it already lies in R(i, k1).
3. V[i, j] = exp(−d(i, j)) / Σ_{j' ∈ R*(i)} exp(−d(i, j')) for j ∈ R*(i), else 0 (a sparse row that
   sums to 1). With k2 > 1 ("local query expansion") each row is replaced by the mean of the rows of
   its k2 nearest images.
4. Jaccard distance d_J(i, j) = 1 − Σ_k min(V[i,k], V[j,k]) / Σ_k max(V[i,k], V[j,k]); since the rows
   sum to 1, Σ max = 2 − Σ min.
5. final(i, j) = (1 − λ) d_J(i, j) + λ d(i, j) for query i and gallery j.

Memory: the published code builds the dense (q+g)² distance, rank and V matrices. At MSMT17 size
(n ≈ 94k) each is 35 GB. Here the distance matrix is only ever seen in row blocks, only the
top-(k1+1) neighbour lists are kept (n × 21 ints), V is stored sparse (CSR, ~k1..k1·k1/2 entries per
row), and the Jaccard term of a query block is accumulated through an inverted index (for every
column of V, the gallery rows where it is non-zero), so only a block × g slice of the output is ever
dense besides the returned q × g matrix itself.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

# A distance matrix as the caller holds it: a NumPy array or a torch tensor.
ArrayLike = Union[np.ndarray, torch.Tensor]

# A sparse matrix in compressed rows: (indptr, indices, values).
CSR = Tuple[np.ndarray, np.ndarray, np.ndarray]

__all__ = ["re_ranking"]

# Rows of the (q+g)-wide distance matrix handled at once: ~2^22 float64 elements = 32 MB per block.
_DEFAULT_BLOCK_ELEMENTS = 1 << 22


def _as_float_array(x: ArrayLike, name: str, shape: Optional[Tuple[int, int]]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


class _Distances:
    """Row access to the row-normalised squared distance over all q+g images, without building it."""

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> None:
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_q, self.num_g = q_g.shape
        self.n = self.num_q + self.num_g
        # Row maxima of the squared distances (step 1). For a query row: its q_q and q_g rows; for a
        # gallery row j: column j of q_g (= row j of g_q) and row j of g_g.
        sq_max_q = np.maximum(np.square(q_q, dtype=np.float64).max(axis=1, initial=0.0),
                              np.square(q_g, dtype=np.float64).max(axis=1, initial=0.0))
        sq_max_g = np.maximum(np.square(q_g, dtype=np.float64).max(axis=0, initial=0.0),
                              np.square(g_g, dtype=np.float64).max(axis=1, initial=0.0))
        row_max = np.concatenate([sq_max_q, sq_max_g])
        # An image at distance 0 from everything (e.g. an all-zero row) gets no scaling rather than NaN.
        self.row_max = np.where(row_max > 0, row_max, 1.0)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """d(i, :) for start <= i < stop, float64 [stop-start, n]."""
        out = np.empty((stop - start, self.n), dtype=np.float64)
        nq = self.num_q
        if start < nq:
            s, e = start, min(stop, nq)
            out[: e - s, :nq] = self.q_q[s:e]
            out[: e - s, nq:] = self.q_g[s:e]
        if stop > nq:
            s, e = max(start, nq) - nq, stop - nq
            o = max(start, nq) - start
            out[o:, :nq] = self.q_g[:, s:e].T
            out[o:, nq:] = self.g_g[s:e]
        np.square(out, out=out)
        out /= self.row_max[start:stop, None]
        return out

    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """d(i[m], j[m]) for index arrays i, j (any image of the n), float64."""
        nq = self.num_q
        raw = np.empty(i.shape, dtype=np.float64)
        iq, jq = i < nq, j < nq
        m = iq & jq
        raw[m] = self.q_q[i[m], j[m]]
        m = iq & ~jq
        raw[m] = self.q_g[i[m], j[m] - nq]
        m = ~iq & jq
        raw[m] = self.q_g[j[m], i[m] - nq]
        m = ~iq & ~jq
        raw[m] = self.g_g[i[m] - nq, j[m] - nq]
        return np.square(raw) / self.row_max[i]


def _nearest(dist: _Distances, k: int, block: int) -> np.ndarray:
    """The k nearest images of every image, nearest first, ties by index: int64 [n, k]."""
    n = dist.n
    ranks = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = dist.rows(start, stop)
        if k < n:
            cand = np.argpartition(d, k - 1, axis=1)[:, :k]
        else:
            cand = np.broadcast_to(np.arange(n), d.shape).copy()
        cand_d = np.take_along_axis(d, cand, axis=1)
        # Sort the k candidates by (distance, index) so the order is reproducible.
        order = np.lexsort((cand, cand_d), axis=1)
        ranks[start:stop] = np.take_along_axis(cand, order, axis=1)
    return ranks


def _reciprocal_mask(ranks: np.ndarray, k: int, budget: int) -> np.ndarray:
    """mask[i, a] = True where ranks[i, a] is a k-reciprocal neighbour of i (i ∈ N(ranks[i, a], k))."""
    n = ranks.shape[0]
    forward = ranks[:, :k]
    mask = np.empty(forward.shape, dtype=bool)
    step = max(1, budget // (k * k))
    for start in range(0, n, step):
        stop = min(n, start + step)
        backward = forward[forward[start:stop]]  # [rows, k, k]: the k-NN lists of i's k-NN
        mask[start:stop] = (backward == np.arange(start, stop)[:, None, None]).any(axis=2)
    return mask


def _dedupe_rows(cols: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row unique non-negative entries of a padded [rows, w] int array (padding = -1).

    Returns (row index, column) of the unique entries, row-major and sorted by column within a row.
    """
    s = np.sort(cols, axis=1)
    keep = s >= 0
    keep[:, 1:] &= s[:, 1:] != s[:, :-1]
    rows = np.nonzero(keep)[0]
    return rows, s[keep]


def _k_reciprocal_weights(dist: _Distances, ranks: np.ndarray, k1: int, budget: int) -> CSR:
    """Sparse V of step 3 (before query expansion), CSR (indptr, indices, values)."""
    n = dist.n
    k = min(k1 + 1, n)
    # round(k1/2) as NumPy rounds (half to even), as in the paper's released code.
    k_half = min(int(np.around(k1 / 2.0)) + 1, n)
    recip = _reciprocal_mask(ranks, k, budget)            # R(i, k1) as a mask over ranks[i, :k]
    recip_half = _reciprocal_mask(ranks, k_half, budget)  # R(i, k1/2) as a mask over ranks[i, :k_half]
    fwd = np.where(recip, ranks[:, :k], -1)              # R(i, k1), padded with -1
    fwd_half = np.where(recip_half, ranks[:, :k_half], -1)
    half_size = recip_half.sum(axis=1)

    indptr = np.zeros(n + 1, dtype=np.int64)
    all_cols, all_vals = [], []
    step = max(1, budget // (k * k_half * k))
    for start in range(0, n, step):
        stop = min(n, start + step)
        R = fwd[start:stop]                                  # [r, k]
        cand = np.where(R >= 0, R, 0)
        cand_sets = np.where(R[:, :, None] >= 0, fwd_half[cand], -1)  # [r, k, k_half]: R(c, k1/2)
        # |R(c, k1/2) ∩ R(i, k1)|: entries of R(c, k1/2) that appear in R(i, k1).
        inside = ((cand_sets[:, :, :, None] == R[:, None, None, :]) & (cand_sets[:, :, :, None] >= 0)).any(axis=3)
        overlap = inside.sum(axis=2)
        c_size = np.where(R >= 0, half_size[cand], 0)
        expand = (R >= 0) & (overlap > (2.0 / 3.0) * c_size)
        grown = np.where(expand[:, :, None], cand_sets, -1).reshape(stop - start, -1)
        rows, cols = _dedupe_rows(np.concatenate([R, grown], axis=1))
        w = np.exp(-dist.pairs(rows + start, cols))
        counts = np.bincount(rows, minlength=stop - start)
        norm = np.bincount(rows, weights=w, minlength=stop - start)
        all_cols.append(cols)
        all_vals.append(w / norm[rows])
        indptr[start + 1: stop + 1] = counts
    np.cumsum(indptr, out=indptr)
    return indptr, np.concatenate(all_cols), np.concatenate(all_vals)


def _gather_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner position in `rows`, column, value) of all entries of the given CSR rows."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(rows)), counts)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
    return owner, indices[offsets], values[offsets]


def _query_expansion(csr: CSR, ranks: np.ndarray, k2: int, n: int, budget: int) -> CSR:
    """V_qe[i] = mean of V[j] over the k2 nearest images j of i (step 3, local query expansion)."""
    indptr, indices, values = csr
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    cols_out, vals_out = [], []
    step = max(1, budget // max(1, k2 * 64))
    for start in range(0, n, step):
        stop = min(n, start + step)
        nbrs = ranks[start:stop, :k2].reshape(-1)
        owner, cols, vals = _gather_csr(indptr, indices, values, nbrs)
        row = owner // k2  # local row of the expanded image
        key = row * n + cols
        uniq, inv = np.unique(key, return_inverse=True)
        summed = np.bincount(inv, weights=vals, minlength=len(uniq)) / k2
        urow = uniq // n
        cols_out.append(uniq % n)
        vals_out.append(summed)
        new_ptr[start + 1: stop + 1] = np.bincount(urow, minlength=stop - start)
    np.cumsum(new_ptr, out=new_ptr)
    return new_ptr, np.concatenate(cols_out), np.concatenate(vals_out)


def re_ranking(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, block_size: Optional[int] = None) -> np.ndarray:
    """k-reciprocal re-ranked query-gallery distances.

    Args:
        q_g_dist: [num_q, num_g] query-gallery distances (e.g. cosine or Euclidean).
        q_q_dist: [num_q, num_q] query-query distances.
        g_g_dist: [num_g, num_g] gallery-gallery distances.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: size of the local query expansion (paper: 6; 1 switches it off).
        lambda_value: weight of the original distance in the final one (paper: 0.3).
        block_size: rows of the (q+g)-wide distance handled at once (default: ~32 MB per block).
            The result does not depend on it.

    Returns:
        [num_q, num_g] re-ranked distances, float32 unless the inputs are float64.

    The input distances should be symmetric where they compare an image with itself (q_q, g_g).
    """
    q_g = _as_float_array(q_g_dist, "q_g_dist", None)
    num_q, num_g = q_g.shape
    q_q = _as_float_array(q_q_dist, "q_q_dist", (num_q, num_q))
    g_g = _as_float_array(g_g_dist, "g_g_dist", (num_g, num_g))
    if num_q == 0 or num_g == 0:
        raise ValueError(f"re_ranking needs at least one query and one gallery item, q_g_dist is {q_g.shape}")
    for name, v in (("k1", k1), ("k2", k2)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    out_dtype = np.float64 if all(a.dtype == np.float64 for a in (q_g, q_q, g_g)) else np.float32

    dist = _Distances(q_g, q_q, g_g)
    n = dist.n
    if block_size is None:
        block = max(1, _DEFAULT_BLOCK_ELEMENTS // n)
    else:
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        block = int(block_size)
    # Work-array budget (elements) of the vectorised steps: a block's worth of the distance rows.
    elements = block * n

    k_keep = min(max(k1 + 1, k2), n)
    ranks = _nearest(dist, k_keep, block)
    V = _k_reciprocal_weights(dist, ranks, k1, elements)
    if k2 > 1:
        V = _query_expansion(V, ranks, min(k2, n), n, elements)
    indptr, indices, values = V

    # Inverted index over the gallery rows of V: for every column, the gallery rows (0-based gallery
    # index) where it is non-zero, with the value. Sorting the gallery entries by column gives CSC.
    g_start = indptr[num_q]
    g_cols = indices[g_start:]
    g_vals = values[g_start:]
    g_rows = np.repeat(np.arange(num_g), np.diff(indptr[num_q:]))
    by_col = np.argsort(g_cols, kind="stable")
    col_ptr = np.zeros(n + 1, dtype=np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(g_cols, minlength=n))
    inv_rows, inv_vals = g_rows[by_col], g_vals[by_col]

    final = np.empty((num_q, num_g), dtype=out_dtype)
    q_block = max(1, min(block, elements // max(1, num_g)))
    for start in range(0, num_q, q_block):
        stop = min(num_q, start + q_block)
        # Non-zeros of V for the query rows of this block.
        owner, cols, vq = _gather_csr(indptr, indices, values, np.arange(start, stop))
        # Join with the inverted index: every gallery row j sharing column k with query i adds
        # min(V[i,k], V[j,k]) to the overlap S[i, j].
        o2, g_idx, vg = _gather_csr(col_ptr, inv_rows, inv_vals, cols)
        overlap = np.bincount(owner[o2] * num_g + g_idx, weights=np.minimum(vq[o2], vg),
                              minlength=(stop - start) * num_g).reshape(stop - start, num_g)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        original = np.square(q_g[start:stop], dtype=np.float64) / dist.row_max[start:stop, None]
        final[start:stop] = (1.0 - lambda_value) * jaccard + lambda_value * original
    return final
