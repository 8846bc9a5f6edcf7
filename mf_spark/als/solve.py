"""Block kernels of the implicit-feedback ALS: one weighted least-squares half-step for a block of entities.

Model (Hu, Koren and Volinsky, "Collaborative Filtering for Implicit Feedback Datasets", ICDM 2008,
eqs. 1-4, with Spark MLlib's conventions for negative values and regularisation): for a rating ``r_ui``
the preference is ``p_ui = 1 if r_ui > 0 else 0`` and the confidence is ``c_ui = 1 + alpha*|r_ui|``
(``linear``) or ``1 + alpha*log(1 + |r_ui|/epsilon)`` (``log``, HKV eq. 6); unobserved pairs have
``p = 0, c = 1``. With the fixed side's factors ``y_j`` (all ``n_src_total`` of them) the objective is::

    L = sum_u sum_j c_uj (p_uj - x_u . y_j)^2 + sum_u lambda_u ||x_u||^2 + sum_j lambda_j ||y_j||^2

and for a fixed ``Y`` each ``x_u`` solves (HKV eq. 4, MLlib ``computeFactors``)::

    (YtY + sum_{i in R(u)} (c_ui - 1) y_i y_i^T + lambda_u I) x_u = sum_{i in R(u), r_ui > 0} c_ui y_i

where ``YtY`` is the Gramian of *all* fixed-side factors, so the sum runs over the entity's ratings only.

A block is a CSR matrix over its ``dst`` entities (the side being solved) whose column indices point into
``src_factors``, the fixed-side factors the block has ratings for. Two solvers:

* ``cholesky``: the exact solution. The normal equations are formed in float64 per batch of entities whose
  rating counts fall in the same length class (padded to that class's length, so one batched SYRK per batch
  instead of one rank-one update per rating as in MLlib), then factored with a batched Cholesky.
* ``cg``: ``cg_steps`` conjugate-gradient steps per entity warm-started from the previous factors (Takacs,
  Pilaszy and Tikk, "Applications of the Conjugate Gradient Method for Implicit Feedback Collaborative
  Filtering", RecSys 2011), with ``A p`` computed without forming ``A``; the step order follows
  benfred/implicit's ``_least_squares_cg``. Like implicit's, it works in float32: a few warm-started steps
  gain nothing from float64, and half the bytes per gathered factor make it about 1.5x faster
  (``benchmarks/bench_kernels.py``). Only the objective's sums are accumulated in float64.

Batches are sized to stay near the CPU cache (``_BATCH_BYTES``), so memory stays bounded whatever the
block size; entities with very many ratings are handled alone, their system formed in chunks of ratings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from mf_spark.als.params import SolveParams

logger = logging.getLogger(__name__)

# Working-set bound of one batch (gathered factors, or the batch's k x k systems). A few MiB keeps a
# batch in L2/L3 cache between the passes over it; larger batches only add memory traffic.
_BATCH_BYTES = 4 << 20

# Systems factored together by the Cholesky path: at least _SOLVE_MIN_SYSTEMS (large k) unless that
# exceeds _SOLVE_MAX_BYTES.
_SOLVE_MIN_SYSTEMS = 32
_SOLVE_MAX_BYTES = 64 << 20

# Rating counts up to this are batched at their exact length; above it, counts are rounded up to one of
# _LENGTH_STEPS_PER_OCTAVE lengths per power of two, which bounds the padding to 1/_LENGTH_STEPS_PER_OCTAVE.
_EXACT_LENGTH_MAX = 16
_LENGTH_STEPS_PER_OCTAVE = 8

# CG stops for an entity once its squared residual norm falls below this (benfred/implicit's threshold).
_CG_RESIDUAL_EPS = 1e-20
_CG_DTYPE = np.float32


def confidence_minus_one(ratings: np.ndarray, params: SolveParams) -> np.ndarray:
    """Extra confidence ``c - 1`` of each rating (Hu, Koren and Volinsky 2008, eqs. 1 and 6).

    Parameters
    ----------
    ratings : np.ndarray, shape (nnz,)
        Rating values; negative values count by their magnitude (high-confidence zeros, as in MLlib).
    params : SolveParams
        ``confidence`` selects ``alpha*|r|`` (``linear``) or ``alpha*log(1 + |r|/confidence_epsilon)``
        (``log``).

    Returns
    -------
    np.ndarray, shape (nnz,), float64
        ``c - 1 >= 0``.
    """
    magnitude = np.abs(np.asarray(ratings, dtype=np.float64))
    if params.confidence == "linear":
        return params.alpha * magnitude
    return params.alpha * np.log1p(magnitude / params.confidence_epsilon)


def regularization_weights(n_positive: np.ndarray, n_src_total: int, params: SolveParams) -> np.ndarray:
    """Per-entity regularisation ``lambda_u``.

    ``count``: ``reg_param * n_u`` (ALS-WR, Zhou et al. 2008, as MLlib scales it by the number of
    positive ratings); ``constant``: ``reg_param`` (Hu, Koren and Volinsky 2008); ``frequency``:
    ``reg_param * (n_u + frequency_alpha0 * n_src_total) ** frequency_nu`` (Rendle et al. 2022).

    Parameters
    ----------
    n_positive : np.ndarray, shape (n,)
        Number of positive ratings ``n_u`` of each entity (an entity with only non-positive ratings has 0).
    n_src_total : int
        Number of entities on the fixed side (all of them, not only those in one block).
    params : SolveParams

    Returns
    -------
    np.ndarray, shape (n,), float64
    """
    counts = np.asarray(n_positive, dtype=np.float64)
    if params.regularization == "count":
        return params.reg_param * counts
    if params.regularization == "constant":
        return np.full(counts.shape, float(params.reg_param))
    return params.reg_param * (counts + params.frequency_alpha0 * n_src_total) ** params.frequency_nu


def gramian(factors: np.ndarray) -> np.ndarray:
    """Gramian ``F^T F`` of a factor matrix, accumulated in float64.

    The Spark layer sums the Gramians of all fixed-side partitions to get ``YtY`` for a half-step.

    Parameters
    ----------
    factors : np.ndarray, shape (n, k)

    Returns
    -------
    np.ndarray, shape (k, k), float64
    """
    factors64 = np.asarray(factors, dtype=np.float64)
    return factors64.T @ factors64


def solve_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    src_factors: np.ndarray,
    src_gramian: np.ndarray,
    n_src_total: int,
    params: SolveParams,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Solve the implicit-ALS normal equations of every dst entity of a block (one half-step).

    For each dst row ``u`` (Hu, Koren and Volinsky 2008, eq. 4)::

        (YtY + sum_i (c_ui - 1) y_i y_i^T + lambda_u I) x_u = sum_{i: r_ui > 0} c_ui y_i

    ``params.solver == "cholesky"`` solves exactly (float64 normal equations, batched Cholesky; a batch
    whose systems are not positive definite, e.g. with ``reg_param = 0``, falls back to the pseudo-inverse's
    least-squares solution). ``"cg"`` runs ``params.cg_steps`` float32 conjugate-gradient steps per entity from
    ``init`` (Takacs, Pilaszy and Tikk 2011), stopping early for an entity whose squared residual norm
    falls below 1e-20. A row with no positive rating (none at all, or only zero and negative ones) gets
    the zero vector under both solvers: its right-hand side is 0.

    Parameters
    ----------
    indptr : np.ndarray, shape (n_dst + 1,), int64
        CSR row pointers over the block's dst entities.
    indices : np.ndarray, shape (nnz,), int32
        Row of ``src_factors`` of each rating. Duplicate ``(row, col)`` entries are not merged: each adds
        its own term (the Spark layer sums duplicates first).
    ratings : np.ndarray, shape (nnz,), float32
    src_factors : np.ndarray, shape (n_src_local, k), float32
        Factors of the fixed-side entities this block has ratings for.
    src_gramian : np.ndarray, shape (k, k), float64
        ``YtY`` over all ``n_src_total`` fixed-side factors (see :func:`gramian`).
    n_src_total : int
        Number of fixed-side entities (used by ``frequency`` regularisation).
    params : SolveParams
    init : np.ndarray, shape (n_dst, k), float32, optional
        Previous dst factors: the CG warm start (required for ``cg``, ignored by ``cholesky``).

    Returns
    -------
    np.ndarray, shape (n_dst, k), float32
    """
    return _solve(indptr, indices, ratings, src_factors, src_gramian, n_src_total, params, init)[0]


def solve_block_with_objective(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    src_factors: np.ndarray,
    src_gramian: np.ndarray,
    n_src_total: int,
    params: SolveParams,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`solve_block`, plus the objective of the block's rows at the new factors, almost for free.

    For one row with system ``A x = b`` (``A`` includes ``lambda_u I``) the row's share of the objective
    (Hu, Koren and Volinsky 2008, eq. 3: its data term over *all* src entities plus ``lambda_u |x|^2``) is
    ``x^T A x - 2 b.x + sum_{i: r_ui > 0} c_ui``. With the solver's residual ``r = b - A x`` this is
    ``sum c - b.x - r.x``: no extra pass over the ratings (CG tracks ``r``; Cholesky has ``r = 0``).
    The value is that of the float64 solution; the float32 factors returned differ from it by a
    second-order amount (the gradient vanishes at the solution), about ``c * delta^2`` per pair: 0.2% of
    the objective at confidences of 4e10, more (even a negative value) towards 1e18.

    Returns
    -------
    factors : np.ndarray, shape (n_dst, k), float32
    objective : float
        ``sum_u [data term of u over all src entities + lambda_u |x_u|^2]`` over the block's rows, as
        the sum of both values of :func:`block_loss`.
    """
    return _solve(indptr, indices, ratings, src_factors, src_gramian, n_src_total, params, init)


def _solve(indptr, indices, ratings, src_factors, src_gramian, n_src_total, params, init) -> tuple[np.ndarray, float]:
    block = _Block.build(indptr, indices, ratings, src_factors, src_gramian, n_src_total, params, init)
    solved = np.zeros((block.n_dst, block.rank), dtype=np.float32)
    # sum over rows of (b.x + r.x), the part of the objective that depends on the solution
    solution_terms = 0.0
    if params.solver == "cholesky":
        # Systems are formed per length class but factored in full batches: the solve's cost per call
        # (a Python loop over k) is then shared by many systems even where a length class is small.
        pending = _PendingSystems(block.rank, solved)
        for rows, length in block.batches():
            matrices, rhs = pending.reserve(rows)
            block.normal_equations(rows, length, matrices, rhs)
        for row in block.long_rows:
            matrices, rhs = pending.reserve(np.array([row]))
            matrices[0], rhs[0] = block.long_normal_equations(row)
        pending.flush()
        solution_terms = pending.rhs_dot_solution
    else:
        for rows, length in block.batches(dense_systems=False):
            gathered = block.gather(rows, length)
            rhs = _batched_rmatvec(gathered.factors, gathered.positive_weights)
            apply_matrix = block.implicit_operator(rows, gathered)
            x, residual = _conjugate_gradient(apply_matrix, rhs, block.init[rows], params.cg_steps)
            solved[rows] = x
            solution_terms += float(np.einsum("bk,bk->", x, rhs + residual, dtype=np.float64))
        # An entity too long to gather at once gets its system formed in chunks; CG then runs on it.
        for row in block.long_rows:
            matrix, rhs = block.long_normal_equations(row)
            x, residual = _conjugate_gradient(lambda v, m=matrix: v @ m, rhs[None], block.init[[row]], params.cg_steps)
            solved[row] = x[0]
            solution_terms += float(x[0] @ (rhs + residual[0]))
    return solved, float(block.positive_weights.sum()) - solution_terms


def reference_solve(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    src_factors: np.ndarray,
    src_gramian: np.ndarray,
    n_src_total: int,
    params: SolveParams,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Plain per-entity version of :func:`solve_block`, for tests only (slow: Python loops).

    Builds each dense ``A_u`` and ``b_u`` of Hu, Koren and Volinsky (2008, eq. 4) rating by rating, then
    ``np.linalg.solve`` (``lstsq`` when singular) for ``cholesky``, or textbook conjugate gradient with
    ``params.cg_steps`` steps from ``init`` for ``cg``. Same parameters, shapes and return as
    :func:`solve_block`.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    factors = np.asarray(src_factors, dtype=np.float64)
    n_dst, rank = len(indptr) - 1, factors.shape[1]
    if params.solver == "cg" and init is None:
        raise ValueError("solver 'cg' needs init, the previous dst factors (n_dst, k)")
    solved = np.zeros((n_dst, rank), dtype=np.float32)
    for u in range(n_dst):
        if not np.any(np.asarray(ratings[indptr[u] : indptr[u + 1]]) > 0):
            continue  # b = 0: the solution is the zero vector
        matrix = np.array(src_gramian, dtype=np.float64)
        rhs = np.zeros(rank)
        n_positive = 0
        for e in range(indptr[u], indptr[u + 1]):
            y, r = factors[indices[e]], float(ratings[e])
            if params.confidence == "linear":
                extra = params.alpha * abs(r)
            else:
                extra = params.alpha * np.log(1.0 + abs(r) / params.confidence_epsilon)
            matrix += extra * np.outer(y, y)
            if r > 0:
                rhs += (1.0 + extra) * y
                n_positive += 1
        if params.regularization == "count":
            lam = params.reg_param * n_positive
        elif params.regularization == "constant":
            lam = params.reg_param
        else:
            frequency = n_positive + params.frequency_alpha0 * n_src_total
            lam = params.reg_param * frequency**params.frequency_nu
        matrix += lam * np.eye(rank)
        if params.solver == "cholesky":
            try:
                solved[u] = np.linalg.solve(matrix, rhs)
            except np.linalg.LinAlgError:
                solved[u] = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
            continue
        x = np.array(init[u], dtype=np.float64)
        residual = rhs - matrix @ x
        direction = residual.copy()
        rs_old = residual @ residual
        if rs_old < _CG_RESIDUAL_EPS:
            solved[u] = x
            continue
        for _ in range(params.cg_steps):
            a_direction = matrix @ direction
            curvature = direction @ a_direction
            if curvature <= 0:
                break
            step = rs_old / curvature
            x += step * direction
            residual -= step * a_direction
            rs_new = residual @ residual
            if rs_new < _CG_RESIDUAL_EPS:
                break
            direction = residual + (rs_new / rs_old) * direction
            rs_old = rs_new
        solved[u] = x
    return solved


def block_loss(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    dst_factors: np.ndarray,
    src_factors: np.ndarray,
    src_gramian: np.ndarray,
    n_src_total: int,
    params: SolveParams,
) -> tuple[float, float]:
    """The implicit-ALS objective restricted to a block's dst rows (Hu, Koren and Volinsky 2008, eq. 3).

    ``data_term = sum_u sum_j c_uj (p_uj - x_u . y_j)^2`` over the block's dst rows and *all*
    ``n_src_total`` fixed-side entities ``j`` (unobserved: ``c = 1, p = 0``), computed without scoring
    every pair: ``sum_u x_u^T YtY x_u + sum_observed [c (p - s)^2 - s^2]`` with ``s = x_u . y_j``.
    ``dst_regularization_term = sum_u lambda_u ||x_u||^2``.

    The full objective of a model is the sum of ``data_term + dst_regularization_term`` over all user
    blocks (users as dst, items as src) plus :func:`regularization_loss` over all item factors.

    Parameters
    ----------
    indptr, indices, ratings
        The block's CSR matrix, as in :func:`solve_block`.
    dst_factors : np.ndarray, shape (n_dst, k)
    src_factors : np.ndarray, shape (n_src_local, k)
    src_gramian : np.ndarray, shape (k, k), float64
        Gramian of all ``n_src_total`` fixed-side factors.
    n_src_total : int
    params : SolveParams

    Returns
    -------
    tuple[float, float]
        ``(data_term, dst_regularization_term)``.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    dst = np.asarray(dst_factors, dtype=np.float64)
    src = np.asarray(src_factors, dtype=np.float64)
    extra = confidence_minus_one(ratings, params)
    positive = np.asarray(ratings) > 0
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    observed = 0.0
    chunk = max(1, _BATCH_BYTES // (8 * max(1, src.shape[1])))
    for lo in range(0, len(rows), chunk):
        hi = min(lo + chunk, len(rows))
        scores = np.einsum("ek,ek->e", dst[rows[lo:hi]], src[indices[lo:hi]])
        residual = positive[lo:hi] - scores
        observed += float(np.sum((1.0 + extra[lo:hi]) * residual * residual - scores * scores))
    unobserved = float(np.einsum("uk,kl,ul->", dst, np.asarray(src_gramian, dtype=np.float64), dst))
    lam = regularization_weights(_positive_counts(indptr, ratings), n_src_total, params)
    return unobserved + observed, float(lam @ np.einsum("uk,uk->u", dst, dst))


def regularization_loss(
    n_positive: np.ndarray, factors: np.ndarray, n_src_total: int, params: SolveParams
) -> float:
    """``sum_i lambda_i ||y_i||^2`` of one side's factors, the term :func:`block_loss` leaves out.

    Parameters
    ----------
    n_positive : np.ndarray, shape (n,)
        Positive-rating count of each entity of ``factors``.
    factors : np.ndarray, shape (n, k)
    n_src_total : int
        Number of entities on the *other* side (for item factors: the number of users), as in
        :func:`regularization_weights`.
    params : SolveParams

    Returns
    -------
    float
    """
    factors64 = np.asarray(factors, dtype=np.float64)
    lam = regularization_weights(n_positive, n_src_total, params)
    return float(lam @ np.einsum("uk,uk->u", factors64, factors64))


def _positive_counts(indptr: np.ndarray, ratings: np.ndarray) -> np.ndarray:
    """Number of positive ratings per CSR row, shape (n_rows,), int64."""
    cumulative = np.zeros(len(ratings) + 1, dtype=np.int64)
    np.cumsum(np.asarray(ratings) > 0, out=cumulative[1:])
    return np.diff(cumulative[np.asarray(indptr, dtype=np.int64) - indptr[0]])


def _padded_lengths(counts: np.ndarray) -> np.ndarray:
    """Batch length of each row count: exact up to ``_EXACT_LENGTH_MAX``, then rounded up to one of
    ``_LENGTH_STEPS_PER_OCTAVE`` lengths per power of two."""
    counts = np.asarray(counts, dtype=np.int64)
    octave = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    step = np.maximum(1, (1 << octave) // _LENGTH_STEPS_PER_OCTAVE)
    rounded = -(-counts // step) * step
    return np.where(counts <= _EXACT_LENGTH_MAX, counts, rounded)


class _Gathered:
    """Ratings of a batch of rows, padded to a common length.

    ``factors`` (nb, L, k), float64 for ``cholesky`` and float32 for ``cg``: the src factor of each rating
    (padding: any factor, weight 0);
    ``extra_confidence`` (nb, L): ``c - 1`` (0 on padding); ``positive_weights`` (nb, L): ``c`` where
    ``r > 0`` else 0.
    """

    __slots__ = ("factors", "extra_confidence", "positive_weights")

    def __init__(self, factors: np.ndarray, extra_confidence: np.ndarray, positive_weights: np.ndarray):
        self.factors = factors
        self.extra_confidence = extra_confidence
        self.positive_weights = positive_weights


class _Block:
    """Per-block arrays shared by all batches of one :func:`solve_block` call."""

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        extra: np.ndarray,
        positive_weights: np.ndarray,
        src: np.ndarray,
        gramian_: np.ndarray,
        lam: np.ndarray,
        init: np.ndarray | None,
        n_positive: np.ndarray,
    ):
        self.indptr = indptr
        self.indices = indices
        self.extra = extra
        self.positive_weights = positive_weights
        self.src = src
        self.gramian = gramian_
        self.lam = lam
        self.init = init
        self.n_dst = len(indptr) - 1
        self.rank = src.shape[1]
        self.counts = np.diff(indptr)
        # A row without a positive rating has b = 0, so its solution is exactly 0 (the least-norm one
        # where A is singular, as under count regularisation, whose lambda is then 0); it is left at 0
        # unsolved. CG from a warm start would only shrink the old vector, leaving ~1e-8 that passes
        # every exact-zero test and that cosine similarity scales back to a unit vector.
        self.solvable = n_positive > 0
        # Longest row gathered in one piece; longer rows get their system formed chunk by chunk.
        self.max_gather_length = max(1, _BATCH_BYTES // (8 * self.rank))
        self.long_rows = np.flatnonzero(self.solvable & (self.counts > self.max_gather_length))

    @classmethod
    def build(
        cls,
        indptr: np.ndarray,
        indices: np.ndarray,
        ratings: np.ndarray,
        src_factors: np.ndarray,
        src_gramian: np.ndarray,
        n_src_total: int,
        params: SolveParams,
        init: np.ndarray | None,
    ) -> _Block:
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices)
        ratings = np.asarray(ratings)
        # CG works in float32 (as benfred/implicit's CG); the Cholesky path forms float64 normal
        # equations as MLlib does.
        work = np.float64 if params.solver == "cholesky" else _CG_DTYPE
        src = np.asarray(src_factors, dtype=work)
        gramian_ = np.asarray(src_gramian, dtype=work)
        if indptr.ndim != 1 or len(indptr) < 1:
            raise ValueError(f"indptr must be 1-D with n_dst + 1 entries, got shape {indptr.shape}")
        if src.ndim != 2:
            raise ValueError(f"src_factors must be (n_src_local, k), got shape {src.shape}")
        rank = src.shape[1]
        if gramian_.shape != (rank, rank):
            raise ValueError(f"src_gramian must be ({rank}, {rank}), got shape {gramian_.shape}")
        if indices.shape != ratings.shape or indices.ndim != 1:
            raise ValueError(f"indices {indices.shape} and ratings {ratings.shape} must be equal 1-D shapes")
        if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
            raise ValueError(f"indptr must rise from 0 to nnz={len(indices)}, got {indptr[0]}..{indptr[-1]}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(src)):
            raise ValueError(f"indices must lie in [0, {len(src)}), got {indices.min()}..{indices.max()}")
        n_dst = len(indptr) - 1
        init_work = None
        if params.solver == "cg":
            if init is None:
                raise ValueError("solver 'cg' needs init, the previous dst factors (n_dst, k)")
            init_work = np.asarray(init, dtype=work)
            if init_work.shape != (n_dst, rank):
                raise ValueError(f"init must be ({n_dst}, {rank}), got shape {init_work.shape}")
        extra = confidence_minus_one(ratings, params).astype(work, copy=False)
        positive_weights = np.where(ratings > 0, 1.0 + extra, 0.0).astype(work, copy=False)
        n_positive = _positive_counts(indptr, ratings)
        lam = regularization_weights(n_positive, n_src_total, params).astype(work, copy=False)
        return cls(indptr, indices, extra, positive_weights, src, gramian_, lam, init_work, n_positive)

    def batches(self, dense_systems: bool = True) -> Iterator[tuple[np.ndarray, int]]:
        """Yield ``(rows, length)``: rows (nb,) with counts in one length class, sized to _BATCH_BYTES.

        Empty rows, rows without a positive rating and long rows are left out. With ``dense_systems``
        the batch's (nb, k, k) systems count towards the bound as well as its gathered factors.
        """
        counts = self.counts
        candidates = np.flatnonzero(self.solvable & (counts <= self.max_gather_length))
        lengths = _padded_lengths(counts[candidates])
        order = np.argsort(lengths, kind="stable")
        candidates, lengths = candidates[order], lengths[order]
        boundaries = np.flatnonzero(np.diff(lengths)) + 1
        for group in np.split(np.arange(len(candidates)), boundaries):
            if len(group) == 0:
                continue
            length = int(lengths[group[0]])
            per_row = 8 * self.rank * max(length, self.rank if dense_systems else 1)
            size = max(1, _BATCH_BYTES // per_row)
            for lo in range(0, len(group), size):
                yield candidates[group[lo : lo + size]], length

    def gather(self, rows: np.ndarray, length: int) -> _Gathered:
        """Ratings of ``rows`` padded to ``length`` (see :class:`_Gathered`)."""
        starts = self.indptr[rows]
        positions = starts[:, None] + np.arange(length)
        counts = self.counts[rows]
        if np.all(counts == length):
            extra = self.extra[positions]
            positive_weights = self.positive_weights[positions]
        else:
            padding = np.arange(length) >= counts[:, None]
            positions[padding] = starts[np.nonzero(padding)[0]]
            extra = self.extra[positions]
            extra[padding] = 0.0
            positive_weights = self.positive_weights[positions]
            positive_weights[padding] = 0.0
        factors = self.src.take(self.indices[positions], axis=0)
        return _Gathered(factors, extra, positive_weights)

    def normal_equations(self, rows: np.ndarray, length: int, matrices: np.ndarray, rhs: np.ndarray) -> None:
        """Write ``A`` (nb, k, k) and ``b`` (nb, k) of ``rows`` (float64, eq. 4 of Hu, Koren and Volinsky)
        into ``matrices`` and ``rhs``."""
        gathered = self.gather(rows, length)
        rhs[:] = _batched_rmatvec(gathered.factors, gathered.positive_weights)
        weighted = gathered.factors
        weighted *= np.sqrt(gathered.extra_confidence)[:, :, None]
        # G^T G of one buffer with itself: numpy's matmul runs BLAS syrk per system.
        np.matmul(weighted.transpose(0, 2, 1), weighted, out=matrices)
        matrices += self.gramian
        matrices.reshape(len(rows), -1)[:, :: self.rank + 1] += self.lam[rows, None]

    def long_normal_equations(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """``A`` (k, k) and ``b`` (k,) of one row too long to gather at once, chunk by chunk."""
        matrix = self.gramian + self.lam[row] * np.eye(self.rank)
        rhs = np.zeros(self.rank)
        for lo in range(int(self.indptr[row]), int(self.indptr[row + 1]), self.max_gather_length):
            hi = min(lo + self.max_gather_length, int(self.indptr[row + 1]))
            factors = self.src.take(self.indices[lo:hi], axis=0)
            rhs += self.positive_weights[lo:hi] @ factors
            weighted = factors * np.sqrt(self.extra[lo:hi])[:, None]
            matrix += weighted.T @ weighted
        return matrix, rhs

    def implicit_operator(self, rows: np.ndarray, gathered: _Gathered) -> Callable[[np.ndarray], np.ndarray]:
        """``v -> A v`` for the batch's systems (nb, k) -> (nb, k), without forming ``A``:
        ``YtY v + lambda v + sum_i (c_i - 1)(y_i . v) y_i``."""
        lam = self.lam[rows, None]
        factors, extra = gathered.factors, gathered.extra_confidence

        def apply(v: np.ndarray) -> np.ndarray:
            scores = _batched_matvec(factors, v)
            scores *= extra
            out = _batched_rmatvec(factors, scores)
            out += v @ self.gramian
            out += lam * v
            return out

        return apply


class _PendingSystems:
    """Formed normal equations waiting for a batched solve; solved when full and on :meth:`flush`,
    the solutions written as float32 into ``solved`` (n_dst, k)."""

    def __init__(self, rank: int, solved: np.ndarray):
        # The triangular solve loops over k in Python once per batch: at large k keep enough systems per
        # batch to share that cost, within _SOLVE_MAX_BYTES.
        system_bytes = 8 * rank * rank
        capacity = max(_BATCH_BYTES // system_bytes, _SOLVE_MIN_SYSTEMS)
        capacity = max(1, min(capacity, _SOLVE_MAX_BYTES // system_bytes))
        self.matrices = np.empty((capacity, rank, rank))
        self.rhs = np.empty((capacity, rank))
        self.rows = np.empty(capacity, dtype=np.int64)
        self.filled = 0
        self.solved = solved
        self.rhs_dot_solution = 0.0

    def reserve(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots ``(matrices (nb, k, k), rhs (nb, k))`` for the systems of ``rows``, to be filled in."""
        if self.filled + len(rows) > len(self.rows):
            self.flush()
        if len(rows) > len(self.rows):
            raise ValueError(f"a batch of {len(rows)} systems exceeds the solve capacity {len(self.rows)}")
        lo, hi = self.filled, self.filled + len(rows)
        self.rows[lo:hi] = rows
        self.filled = hi
        return self.matrices[lo:hi], self.rhs[lo:hi]

    def flush(self) -> None:
        if self.filled:
            count = self.filled
            solution = _spd_solve(self.matrices[:count], self.rhs[:count])
            self.solved[self.rows[:count]] = solution
            self.rhs_dot_solution += float(np.einsum("bk,bk->", solution, self.rhs[:count]))
            self.filled = 0


# Below this padded length numpy's einsum beats one BLAS gemv call per system.
_MATVEC_BLAS_MIN_LENGTH = 4


def _batched_matvec(stack: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``stack[b] @ vectors[b]`` for each b: (nb, L, k) x (nb, k) -> (nb, L)."""
    if stack.shape[1] < _MATVEC_BLAS_MIN_LENGTH:
        return np.einsum("blk,bk->bl", stack, vectors)
    return np.matmul(stack, vectors[:, :, None])[:, :, 0]


def _batched_rmatvec(stack: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``vectors[b] @ stack[b]`` for each b: (nb, L, k) x (nb, L) -> (nb, k)."""
    if stack.shape[1] < _MATVEC_BLAS_MIN_LENGTH:
        return np.einsum("blk,bl->bk", stack, vectors)
    return np.matmul(vectors[:, None, :], stack)[:, 0, :]


def _spd_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the batch ``matrix @ x = rhs``, (nb, k, k) and (nb, k) -> (nb, k), by Cholesky.

    If any system of the batch is not numerically positive definite (e.g. ``reg_param = 0`` with a
    rank-deficient Gramian), the whole batch falls back to the pseudo-inverse's least-squares solution,
    counting eigenvalues below 1e-10 of the largest as zero so that round-off adds no component along
    the null directions.
    """
    try:
        lower = np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        eigenvalues = np.linalg.eigvalsh(matrix)
        n_bad = int(np.sum(eigenvalues[:, 0] <= 1e-12 * np.abs(eigenvalues[:, -1])))
        logger.warning(
            "%d of %d normal equations are not positive definite (is reg_param 0?); "
            "using the pseudo-inverse's least-squares solution for this batch",
            n_bad,
            len(matrix),
        )
        return np.matmul(np.linalg.pinv(matrix, rcond=1e-10, hermitian=True), rhs[:, :, None])[:, :, 0]
    return _cholesky_substitution(lower, rhs)


def _cholesky_substitution(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``L L^T x = rhs`` for a batch: forward then back substitution, vectorised over the batch.

    ``lower`` (nb, k, k), ``rhs`` (nb, k) -> (nb, k). numpy has no batched triangular solve; the loops
    run over the k columns, each step a vector operation over the whole batch. Both passes read rows of
    ``L`` (contiguous), the forward pass as dot products, the backward pass (rows of ``L`` are columns of
    ``L^T``) as updates.
    """
    rank = lower.shape[1]
    x = rhs.copy()
    inverse_diagonal = 1.0 / np.diagonal(lower, axis1=1, axis2=2)
    for i in range(rank):
        if i:
            x[:, i] -= np.einsum("bj,bj->b", lower[:, i, :i], x[:, :i])
        x[:, i] *= inverse_diagonal[:, i]
    for i in range(rank - 1, -1, -1):
        x[:, i] *= inverse_diagonal[:, i]
        x[:, :i] -= lower[:, i, :i] * x[:, i, None]
    return x


def _conjugate_gradient(
    apply_matrix: Callable[[np.ndarray], np.ndarray], rhs: np.ndarray, x0: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` CG steps on a batch of SPD systems from ``x0``, each system stopping on its own.

    ``apply_matrix`` maps (nb, k) -> (nb, k); ``rhs`` and ``x0`` are (nb, k). Returns the solutions and
    their residuals ``rhs - A x`` (as CG's recurrence tracks them), both (nb, k). Step order as in
    benfred/implicit's ``_least_squares_cg``: a system whose squared residual norm is below 1e-20 (or
    whose curvature ``p^T A p`` is not positive) takes no further step.
    """
    x = np.array(x0, dtype=rhs.dtype)
    residual = rhs - apply_matrix(x)
    direction = residual.copy()
    rs_old = np.einsum("bk,bk->b", residual, residual)
    active = rs_old >= _CG_RESIDUAL_EPS
    for _ in range(steps):
        if not active.any():
            break
        a_direction = apply_matrix(direction)
        curvature = np.einsum("bk,bk->b", direction, a_direction)
        active &= curvature > 0
        step = np.divide(rs_old, curvature, out=np.zeros_like(rs_old), where=active)
        x += step[:, None] * direction
        residual -= step[:, None] * a_direction
        rs_new = np.einsum("bk,bk->b", residual, residual)
        active &= rs_new >= _CG_RESIDUAL_EPS
        ratio = np.divide(rs_new, rs_old, out=np.zeros_like(rs_new), where=active)
        direction *= ratio[:, None]
        direction += residual
        rs_old = rs_new
    return x, residual
