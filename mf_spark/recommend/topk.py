"""Numpy block kernels of the top-k search: exact, deterministic, memory bounded by tile sizes.

The order of candidates is total: higher score first, then lower dst id. It is encoded in one int64
*sort key* per (score, dst) pair, so every selection (``np.argpartition``) is exact without a tie
fix-up pass, and the score can be decoded back bit for bit:

* high 32 bits: the float32 score's bits mapped to a signed int whose order is the float order
  (``-0.0`` is canonicalised to ``+0.0`` first, so the two zeros tie as numpy compares them);
* low 32 bits: ``2**32 - 1 - column``, so a lower column (= lower dst id, columns are sorted by id)
  gives a larger key.

**The score** of a pair is defined independently of how pairs are grouped: the float64 sum of the
float64 products of the float32 factors (each product is exact), in an order fixed by the rank,
rounded once to float32 (:func:`exact_scores`). A float32 GEMM, which the search uses for speed, rounds differently
depending on a pair's place in the tile (its row in the block, the tile width, the BLAS kernel), so
its scores alone made a list depend on ``user_block_size``, ``item_chunk_size``, the plan and the other
users of the block, and let a higher id win a tie between identical item vectors. The search therefore
keeps ``k + RESCORE_MARGIN`` GEMM candidates per row, rescored exactly; a row whose margin cannot
rule out a column left out (its last candidate is within the GEMM's error bound of the k-th exact
score: near-identical vectors beyond the margin) is scored exactly over all columns.

A block of ``m`` src rows is scored against the dst matrix in tiles of at most ``tile_elements``
float32 scores. Columns are visited in ascending id order, starting with a narrow tile whose exact
top-k gives every row a threshold; later tiles only look at scores strictly above the row's current
k-th best score. A later column has a higher id than everything already kept, so a score equal to
the threshold loses its tie and never needs to be looked at. Tiles grow geometrically, which keeps
the expected number of candidates per row and tile near ``k`` for scores in random order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Scores per tile (float32): 2**21 = 8 MiB, small enough to stay near the L2/L3 caches of a core.
DEFAULT_TILE_ELEMENTS = 1 << 21
#: Widest column tile. Wider tiles leave fewer rows per tile and so smaller, slower GEMMs; 8-16k
#: columns measured fastest for rank 32 and 20k-100k items (about 25% less CPU than 50k).
DEFAULT_MAX_TILE_COLUMNS = 16384

#: GEMM candidates kept per row beyond k, to be rescored exactly (see the module docstring).
RESCORE_MARGIN = 16
#: Gathered factor values (float64) held at once while rescoring; 2**16 measured 1.7x faster than 2**20.
_RESCORE_ELEMENTS = 1 << 16

_LOW_MASK = np.int64(0xFFFFFFFF)
_SIGN_FLIP = np.int64(0x7FFFFFFF)
#: Key assigned to padding: below the key of any real score, including -inf.
_PAD_KEY = np.iinfo(np.int64).min
#: High half of the key of a -inf score; keys at or below it are masked candidates and are dropped.
_NEG_INF_HIGH = int(np.int64(np.array([-np.inf], np.float32).view(np.int32)[0]) ^ 0x7FFFFFFF)


def score_keys(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Sort keys of (score, column) pairs; larger key = better (higher score, then lower column).

    Parameters
    ----------
    scores : float32 array, any shape
    columns : int array broadcastable to ``scores``, values in ``[0, 2**32)``

    Returns
    -------
    int64 array of the broadcast shape.
    """
    canonical = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = canonical.view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ _SIGN_FLIP, bits)
    return (ordered << 32) | (_LOW_MASK - np.asarray(columns, dtype=np.int64))


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`score_keys`: ``(scores float32, columns int64)``, each of ``keys``' shape."""
    high = keys >> 32
    bits = np.where(high < 0, high ^ _SIGN_FLIP, high).astype(np.int32)
    return bits.view(np.float32), _LOW_MASK - (keys & _LOW_MASK)


def is_real_key(keys: np.ndarray) -> np.ndarray:
    """True where a key holds a finite candidate (not padding, not a masked -inf score); ``keys``' shape."""
    return (keys >> 32) > _NEG_INF_HIGH


def top_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest keys of each row, unsorted: ``(rows, min(k, cols))`` int64."""
    n_cols = keys.shape[1]
    if n_cols <= k:
        return keys
    picked = np.argpartition(keys, n_cols - k, axis=1)[:, n_cols - k :]
    return np.take_along_axis(keys, picked, axis=1)


@dataclass(frozen=True)
class TopK:
    """Top-k recommendations of a block as flat arrays, ordered by (src row, rank).

    Attributes
    ----------
    src : (n,) int32 src ids
    rank : (n,) int32, 1..k within each src
    dst : (n,) int32 dst ids
    score : (n,) float32
    """

    src: np.ndarray
    rank: np.ndarray
    dst: np.ndarray
    score: np.ndarray

    @staticmethod
    def empty() -> TopK:
        ints = np.empty(0, np.int32)
        return TopK(ints, ints.copy(), ints.copy(), np.empty(0, np.float32))

    def __len__(self) -> int:
        return int(self.src.shape[0])


def csr_from_pairs(
    row_ids: np.ndarray, row_of: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group ``values`` by the row each belongs to.

    Parameters
    ----------
    row_ids : (m,) int, sorted unique ids of the rows
    row_of : (nnz,) int, id of the row of each value (ids not in ``row_ids`` are dropped)
    values : (nnz,) int

    Returns
    -------
    indptr : (m + 1,) int64
    grouped : int64 values ordered by row, then by value
    """
    pos = np.searchsorted(row_ids, row_of)
    if row_ids.shape[0]:
        keep = (pos < row_ids.shape[0]) & (row_ids[np.minimum(pos, row_ids.shape[0] - 1)] == row_of)
    else:
        keep = np.zeros(pos.shape, bool)
    pos, vals = pos[keep], np.asarray(values, dtype=np.int64)[keep]
    order = np.lexsort((vals, pos))
    indptr = np.zeros(row_ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(pos, minlength=row_ids.shape[0]), out=indptr[1:])
    return indptr, vals[order]


def normalize_rows(factors: np.ndarray) -> np.ndarray:
    """(n, rank) rows scaled to unit L2 norm, (n, rank) float32; all-zero rows stay zero, so their
    cosines are 0."""
    norms = np.linalg.norm(factors.astype(np.float64), axis=1)
    norms[norms == 0] = 1.0
    return (factors / norms[:, None]).astype(np.float32)


def exact_scores(src: np.ndarray, dst: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The scores of ``src`` row ``i`` with the dst rows ``columns[i]``, independent of layout.

    Parameters
    ----------
    src : (t, r) float32
    dst : (n, r) float32
    columns : (t, c) int, indices into ``dst``

    Returns
    -------
    (t, c) float32
        ``float32(sum_j float64(src[i, j]) * float64(dst[col, j]))``: the products are exact and their
        float64 sum is one numpy reduction over the contiguous factor axis, whose order of additions
        depends only on the rank. Every pair goes through the same IEEE operations wherever it sits,
        so its score is the same bits.
    """
    t, c = columns.shape
    r = src.shape[1]
    out = np.empty((t, c), dtype=np.float32)
    if t == 0 or c == 0:
        return out
    step = max(1, _RESCORE_ELEMENTS // (c * max(r, 1)))
    for a in range(0, t, step):
        b = min(a + step, t)
        # float32 -> float64 is exact, and so is the product of two 24-bit mantissas
        products = dst[columns[a:b]].astype(np.float64)  # (rows, c, r), contiguous along r
        products *= src[a:b, None, :]
        # One reduction per pair along its own contiguous length-r axis: numpy's pairwise summation
        # takes the same steps for every pair, wherever it sits in the block.
        out[a:b] = products.sum(axis=2)
    return out


def _exact_row_keys(u: np.ndarray, dst: np.ndarray, k: int, masked: np.ndarray) -> np.ndarray:
    """Top-k keys of one src row scored exactly against every dst row (``masked`` columns: -inf)."""
    n = dst.shape[0]
    scores = np.empty(n, dtype=np.float32)
    step = max(1, _RESCORE_ELEMENTS // max(dst.shape[1], 1))
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        scores[c0:c1] = exact_scores(u[None, :], dst, np.arange(c0, c1)[None, :])[0]
    scores[masked] = -np.inf
    keys = score_keys(scores[None, :], np.arange(n)[None, :])
    return top_keys(keys, min(k, n))[0]


def _rescored_top_k(
    src: np.ndarray,
    dst: np.ndarray,
    candidates: np.ndarray,
    k: int,
    complete: bool,
    error_bounds: np.ndarray,
    masked_of_row,
) -> np.ndarray:
    """``(t, k)`` keys of the exact top-k of each row from its GEMM ``candidates`` (``(t, k')`` keys).

    A column outside the candidates has a GEMM score at most the row's lowest candidate's, hence an exact
    score at most that plus ``error_bounds[row]``. Unless ``complete`` (every column is a candidate), a
    row where that could reach its k-th exact score is scored exactly over all columns.
    """
    real = is_real_key(candidates)
    approx, cols = decode_keys(candidates)
    cols = np.where(real, cols, 0)
    exact = exact_scores(src, dst, cols)
    keys = np.where(real, score_keys(exact, cols), _PAD_KEY)
    best = top_keys(keys, k)
    if complete:
        return best
    kth, _ = decode_keys(best.min(axis=1))  # NaN for padding: the row has fewer than k candidates
    lowest = np.where(real, approx, np.inf).min(axis=1).astype(np.float64)
    full = real.all(axis=1)  # otherwise every unmasked column is already a candidate
    with np.errstate(invalid="ignore"):
        unsure = full & np.isfinite(error_bounds) & ~(lowest + error_bounds < kth.astype(np.float64))
    for row in np.flatnonzero(unsure):
        best[row] = _exact_row_keys(src[row], dst, k, masked_of_row(row))
    return best


def _column_tiles(n_cols: int, k: int, max_width: int) -> list[tuple[int, int]]:
    """Column ranges: a first tile of width ~4k (>= 256), then doubling up to ``max_width``."""
    tiles = []
    start, width = 0, min(max(4 * k, 256), max_width)
    while start < n_cols:
        stop = min(start + width, n_cols)
        tiles.append((start, stop))
        start, width = stop, min(width * 2, max_width)
    return tiles


def block_top_k(
    src_ids: np.ndarray,
    src_factors: np.ndarray,
    dst_ids: np.ndarray,
    dst_factors: np.ndarray,
    k: int,
    *,
    seen_indptr: np.ndarray | None = None,
    seen_dst: np.ndarray | None = None,
    exclude_self: bool = False,
    max_tile_columns: int = DEFAULT_MAX_TILE_COLUMNS,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> TopK:
    """Exact top-k dst per src row of ``src_factors @ dst_factors.T`` with masked pairs removed.

    Parameters
    ----------
    src_ids : (m,) int32, unique
    src_factors : (m, r) float32
    dst_ids : (n,) int32, sorted ascending, unique
    dst_factors : (n, r) float32, rows aligned with ``dst_ids``
    k : int, >= 1
    seen_indptr, seen_dst : CSR over the src rows (``(m + 1,)`` and ``(nnz,)``) of dst *ids* that
        must not be recommended to that row (ids absent from ``dst_ids`` are ignored)
    exclude_self : bool
        Never recommend a dst whose id equals the src id (similar items).
    max_tile_columns : int
        Widest column tile; with ``tile_elements`` it bounds the score buffer.
    tile_elements : int
        Scores per tile; the row tile is ``max(1, tile_elements // width)``.

    Returns
    -------
    TopK
        At most ``k`` rows per src, fewer when fewer dst are left after masking; rows whose factors
        are not finite get none, dst whose factors are not finite are never returned.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m, n = src_factors.shape[0], dst_factors.shape[0]
    if m == 0 or n == 0:
        return TopK.empty()
    if dst_ids.shape[0] > 1 and np.any(np.diff(dst_ids) <= 0):
        raise ValueError("dst_ids must be sorted ascending and unique")
    src_factors = np.ascontiguousarray(src_factors, dtype=np.float32)
    dst_factors = np.ascontiguousarray(dst_factors, dtype=np.float32)
    src_ids = np.asarray(src_ids, dtype=np.int64)
    dst_ids = np.asarray(dst_ids, dtype=np.int64)

    bad_dst = ~np.isfinite(dst_factors).all(axis=1)
    if bad_dst.any():
        dst_factors = dst_factors.copy()
        dst_factors[bad_dst] = 0.0
    good_src = np.isfinite(src_factors).all(axis=1)

    # Masked (row, column) pairs, sorted by column so each tile takes a contiguous slice.
    mask_rows, mask_cols = _mask_pairs(src_ids, dst_ids, seen_indptr, seen_dst, exclude_self)
    bad_cols = np.flatnonzero(bad_dst)

    width_cap = max(1, min(max_tile_columns, n))
    k_eff = min(k, n)
    k_search = min(n, k_eff + RESCORE_MARGIN)
    col_tiles = _column_tiles(n, k_search, width_cap)
    row_tile = max(1, tile_elements // width_cap)
    # |GEMM - exact| <= (r + 1) * 2**-24 * sum_j |u_j v_j| <= (r + 1) * 2**-24 * |u| |v|, doubled for safety
    r = src_factors.shape[1]
    dst_norm = float(np.sqrt(np.einsum("ij,ij->i", dst_factors, dst_factors, dtype=np.float64).max()))
    src_norms = np.sqrt(np.einsum("ij,ij->i", src_factors, src_factors, dtype=np.float64))
    error_bounds = (r + 1) * 2.0**-23 * src_norms * dst_norm

    out_src, out_keys = [], []
    for r0 in range(0, m, row_tile):
        r1 = min(r0 + row_tile, m)
        sel = (mask_rows >= r0) & (mask_rows < r1)
        t_rows, t_cols = mask_rows[sel] - r0, mask_cols[sel]
        candidates = _tile_rows_top_k(src_factors[r0:r1], dst_factors, k_search, col_tiles, t_rows, t_cols,
                                      bad_cols)

        def masked_of_row(row: int, t_rows=t_rows, t_cols=t_cols) -> np.ndarray:
            return np.concatenate([t_cols[t_rows == row], bad_cols])

        best = _rescored_top_k(src_factors[r0:r1], dst_factors, candidates, k_eff, k_search == n,
                               error_bounds[r0:r1], masked_of_row)
        best = np.sort(best, axis=1)[:, ::-1]  # descending keys = rank order
        best[~good_src[r0:r1]] = _PAD_KEY
        out_src.append(np.broadcast_to(src_ids[r0:r1, None], best.shape))
        out_keys.append(best)

    keys = np.concatenate([x.ravel() for x in out_keys])
    srcs = np.concatenate([x.ravel() for x in out_src])
    real = is_real_key(keys)
    keys, srcs = keys[real], srcs[real]
    scores, cols = decode_keys(keys)
    return TopK(srcs.astype(np.int32), _ranks_of_sorted_groups(srcs), dst_ids[cols].astype(np.int32), scores)


def _mask_pairs(
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    seen_indptr: np.ndarray | None,
    seen_dst: np.ndarray | None,
    exclude_self: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) pairs to mask, sorted by row then column."""
    rows_parts, cols_parts = [], []
    if seen_indptr is not None and seen_dst is not None and seen_dst.shape[0]:
        counts = np.diff(seen_indptr)
        rows = np.repeat(np.arange(src_ids.shape[0], dtype=np.int64), counts)
        cols = np.searchsorted(dst_ids, seen_dst)
        found = cols < dst_ids.shape[0]
        found[found] = dst_ids[cols[found]] == seen_dst[found]
        rows_parts.append(rows[found])
        cols_parts.append(cols[found])
    if exclude_self:
        cols = np.searchsorted(dst_ids, src_ids)
        found = cols < dst_ids.shape[0]
        found[found] = dst_ids[cols[found]] == src_ids[found]
        rows_parts.append(np.flatnonzero(found))
        cols_parts.append(cols[found])
    if not rows_parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows, cols = np.concatenate(rows_parts), np.concatenate(cols_parts)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


def _tile_rows_top_k(
    src: np.ndarray,
    dst: np.ndarray,
    k: int,
    col_tiles: list[tuple[int, int]],
    mask_rows: np.ndarray,
    mask_cols: np.ndarray,
    bad_cols: np.ndarray,
) -> np.ndarray:
    """Keys of the top-k columns of each row of ``src @ dst.T`` (unsorted, ``(rows, k)``)."""
    t = src.shape[0]
    best: np.ndarray | None = None
    by_col = np.argsort(mask_cols, kind="stable")
    mask_rows, mask_cols = mask_rows[by_col], mask_cols[by_col]
    buffer = np.empty(t * max(c1 - c0 for c0, c1 in col_tiles), dtype=np.float32)
    for c0, c1 in col_tiles:
        scores = buffer[: t * (c1 - c0)].reshape(t, c1 - c0)
        np.matmul(src, dst[c0:c1].T, out=scores)  # (t, w) float32 GEMM into a reused buffer
        lo, hi = np.searchsorted(mask_cols, [c0, c1])
        if hi > lo:
            scores[mask_rows[lo:hi], mask_cols[lo:hi] - c0] = -np.inf
        blo, bhi = np.searchsorted(bad_cols, [c0, c1])
        if bhi > blo:
            scores[:, bad_cols[blo:bhi] - c0] = -np.inf
        if best is None:
            keys = score_keys(scores, np.arange(c0, c1)[None, :])
            best = top_keys(keys, k)
            if best.shape[1] < k:  # first tile narrower than k: pad so every row holds k slots
                pad = np.full((t, k - best.shape[1]), _PAD_KEY, dtype=np.int64)
                best = np.concatenate([best, pad], axis=1)
            continue
        threshold, _ = decode_keys(best.min(axis=1))
        # Padding decodes to NaN; such rows take every finite score.
        threshold = np.where(np.isnan(threshold), -np.inf, threshold).astype(np.float32)
        # flatnonzero + divmod is several times faster than a 2-D nonzero on a sparse mask
        rows, cols = np.divmod(np.flatnonzero(scores > threshold[:, None]), c1 - c0)
        if rows.shape[0] == 0:
            continue
        best = _merge_candidates(best, rows, score_keys(scores[rows, cols], cols + c0), k)
    assert best is not None
    return best


def _merge_candidates(best: np.ndarray, rows: np.ndarray, cand_keys: np.ndarray, k: int) -> np.ndarray:
    """Update the ``(t, k)`` best keys with candidate keys of the given rows (rows ascending)."""
    touched, starts, counts = np.unique(rows, return_index=True, return_counts=True)
    width = int(counts.max())
    padded = np.full((touched.shape[0], k + width), _PAD_KEY, dtype=np.int64)
    padded[:, :k] = best[touched]
    slot = np.arange(rows.shape[0]) - np.repeat(starts, counts)
    padded[np.repeat(np.arange(touched.shape[0]), counts), k + slot] = cand_keys
    best = best.copy()
    best[touched] = top_keys(padded, k)
    return best


def _ranks_of_sorted_groups(groups: np.ndarray) -> np.ndarray:
    """1-based position of each element within its run of equal consecutive values."""
    n = groups.shape[0]
    if n == 0:
        return np.empty(0, np.int32)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return (np.arange(n) - np.repeat(starts, lengths) + 1).astype(np.int32)


def merge_top_k(src: np.ndarray, dst: np.ndarray, score: np.ndarray, k: int) -> TopK:
    """Exact top-k per src of candidate triples (e.g. per-chunk top-k lists), same order as above.

    Parameters
    ----------
    src, dst : (n,) int, no duplicate (src, dst) pair
    score : (n,) float32
    k : int

    Returns
    -------
    TopK ordered by (src ascending, rank).
    """
    if src.shape[0] == 0:
        return TopK.empty()
    score = np.asarray(score, dtype=np.float32) + np.float32(0.0)
    order = np.lexsort((dst, -score, src))
    src, dst, score = src[order], dst[order], score[order]
    rank = _ranks_of_sorted_groups(src)
    keep = rank <= k
    return TopK(src[keep].astype(np.int32), rank[keep], dst[keep].astype(np.int32), score[keep])


def merge_top_k_lists(lists: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> TopK:
    """:func:`merge_top_k` of several ``(src, dst, score)`` lists, e.g. one block's per-chunk top-k lists."""
    return merge_top_k(*(np.concatenate([part[i] for part in lists]) for i in range(3)), k)
