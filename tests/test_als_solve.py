"""Block kernels of the implicit ALS against plain per-entity numpy and brute-force objectives (no Spark)."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from mf_spark.als import solve
from mf_spark.als.params import SolveParams
from mf_spark.als.solve import (
    block_loss,
    confidence_minus_one,
    gramian,
    reference_solve,
    regularization_loss,
    regularization_weights,
    solve_block,
)

RANK = 6
N_SRC_LOCAL = 40
N_SRC_TOTAL = 55  # the Gramian also covers src entities the block has no ratings for


def make_block(seed: int = 0, duplicates: bool = False) -> dict[str, np.ndarray]:
    """A CSR block with rows of every kind the kernels special-case.

    Rows: empty, one positive rating, one negative rating, only negative ratings, mixed short rows at
    exact lengths, rows padded to a length class (counts above 16), and one long row (36 ratings).
    """
    rng = np.random.default_rng(seed)
    row_counts = [0, 1, 1, 4, 2, 3, 5, 8, 13, 17, 19, 21, 26, 36, 1, 7, 0, 30]
    indptr = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    indices, ratings = [], []
    for row, count in enumerate(row_counts):
        cols = rng.choice(N_SRC_LOCAL, size=count, replace=duplicates)
        values = rng.integers(1, 6, size=count).astype(np.float32) * rng.choice([1.0, 0.5], size=count)
        if row == 2 or row == 3:  # only non-positive ratings: n+ = 0, b = 0
            values = -values
        elif count > 1:
            values[rng.random(count) < 0.2] *= -1
        indices.append(cols)
        ratings.append(values.astype(np.float32))
    src_all = (rng.standard_normal((N_SRC_TOTAL, RANK)) / np.sqrt(RANK)).astype(np.float32)
    src = src_all[:N_SRC_LOCAL]
    return {
        "indptr": indptr,
        "indices": np.concatenate(indices).astype(np.int32),
        "ratings": np.concatenate(ratings).astype(np.float32),
        "src_factors": src,
        "src_gramian": gramian(src_all),
        "init": (rng.standard_normal((len(row_counts), RANK)) / np.sqrt(RANK)).astype(np.float32),
    }


def run(kernel, block: dict[str, np.ndarray], params: SolveParams) -> np.ndarray:
    return kernel(
        block["indptr"],
        block["indices"],
        block["ratings"],
        block["src_factors"],
        block["src_gramian"],
        N_SRC_TOTAL,
        params,
        block["init"],
    )


ALL_MODES = list(itertools.product(("count", "constant", "frequency"), ("linear", "log")))


@pytest.fixture(params=[None, 1024], ids=["default-batches", "tiny-batches"])
def batch_bytes(request, monkeypatch):
    """Also run with a tiny batch budget: many batches and solves, and rows too long to gather at once."""
    if request.param is not None:
        monkeypatch.setattr(solve, "_BATCH_BYTES", request.param)
        monkeypatch.setattr(solve, "_SOLVE_MIN_SYSTEMS", 1)
    return request.param


@pytest.mark.parametrize("regularization,confidence", ALL_MODES)
def test_cholesky_matches_reference_for_every_mode(regularization, confidence, batch_bytes):
    block = make_block(seed=1)
    params = SolveParams(
        alpha=3.0, reg_param=0.07, regularization=regularization, confidence=confidence, frequency_nu=0.7
    )
    got = run(solve_block, block, params)
    expected = run(reference_solve, block, params)
    assert got.dtype == np.float32 and got.shape == (len(block["indptr"]) - 1, RANK)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.all(got[[0, 16]] == 0)  # empty rows
    if regularization == "count":
        # Only negative ratings: b = 0 and A is positive definite through YtY, so x = 0.
        np.testing.assert_allclose(got[[2, 3]], 0.0, atol=1e-7)
    else:
        assert np.abs(got[[1, 14]]).max() > 0  # one positive rating moves the solution


def test_long_rows_take_the_chunked_path(monkeypatch):
    monkeypatch.setattr(solve, "_BATCH_BYTES", 1024)
    block = make_block(seed=1)
    built = solve._Block.build(
        block["indptr"], block["indices"], block["ratings"], block["src_factors"], block["src_gramian"],
        N_SRC_TOTAL, SolveParams(), None,
    )  # fmt: skip
    counts = np.diff(block["indptr"])
    assert built.max_gather_length == 1024 // (8 * RANK)
    np.testing.assert_array_equal(built.long_rows, np.flatnonzero(counts > built.max_gather_length))
    assert len(built.long_rows) >= 3


def test_duplicate_entries_each_add_their_term():
    block = make_block(seed=5, duplicates=True)
    pairs = np.repeat(np.arange(len(block["indptr"]) - 1), np.diff(block["indptr"])) * 1000 + block["indices"]
    assert len(np.unique(pairs)) < len(pairs)
    # a dropped or merged duplicate moves the solution by far more than either tolerance; the CG kernel
    # works in float32, so it gets the bound of test_cg_matches_reference_cg (1e-5 failed by 3e-7 at one
    # element once numpy 2.4.6's OpenBLAS rounded differently)
    for solver, rtol, atol in (("cholesky", 1e-5, 1e-7), ("cg", 1e-4, 1e-6)):
        params = SolveParams(alpha=2.0, reg_param=0.1, solver=solver)
        np.testing.assert_allclose(
            run(solve_block, block, params), run(reference_solve, block, params), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize("regularization,confidence", ALL_MODES)
@pytest.mark.parametrize("steps", [1, 3])
def test_cg_matches_reference_cg(regularization, confidence, steps, batch_bytes):
    block = make_block(seed=2)
    params = SolveParams(
        alpha=4.0,
        reg_param=0.05,
        regularization=regularization,
        confidence=confidence,
        solver="cg",
        cg_steps=steps,
    )
    got = run(solve_block, block, params)
    expected = run(reference_solve, block, params)
    assert got.dtype == np.float32 and got.shape == block["init"].shape
    # the fast CG works in float32 (as benfred/implicit's); the reference in float64. Three steps on
    # systems of condition ~1e2 amplify float32 rounding (6e-8) to a few 1e-7 in absolute terms.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    moved = np.abs(got - block["init"]).max(axis=1)
    assert np.all(moved[np.diff(block["indptr"]) > 0] > 1e-4)  # every non-empty row took CG steps
    assert np.all(got[[0, 16]] == 0)


def test_cg_with_rank_steps_reaches_the_exact_solution(batch_bytes):
    block = make_block(seed=3)
    exact = run(solve_block, block, SolveParams(alpha=2.0, reg_param=0.2))
    cg = run(solve_block, block, SolveParams(alpha=2.0, reg_param=0.2, solver="cg", cg_steps=RANK))
    few = run(solve_block, block, SolveParams(alpha=2.0, reg_param=0.2, solver="cg", cg_steps=2))
    np.testing.assert_allclose(cg, exact, rtol=1e-4, atol=1e-6)
    assert np.abs(few - exact).max() > 100 * np.abs(cg - exact).max()


def test_cg_stops_each_entity_once_its_residual_vanishes():
    """With alpha = 0 and YtY = I every A_u is a multiple of I, so CG converges in its first step; the
    later steps must leave x alone (no 0/0, no NaN). Rows with only negative ratings start at their
    solution x = 0 (b = 0) and take no step at all."""
    block = make_block(seed=3)
    block["src_gramian"] = np.eye(RANK)
    block["init"][[2, 3]] = 0.0
    params = SolveParams(alpha=0.0, reg_param=0.25, solver="cg", cg_steps=3)
    got = run(solve_block, block, params)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, run(reference_solve, block, params), rtol=1e-5, atol=1e-7)
    indptr, ratings = block["indptr"], block["ratings"]
    factors = block["src_factors"].astype(np.float64)[block["indices"]]
    for row in np.flatnonzero(np.diff(indptr)):
        span = slice(indptr[row], indptr[row + 1])
        n_positive = int(np.sum(ratings[span] > 0))
        rhs = (ratings[span] > 0).astype(np.float64) @ factors[span]
        np.testing.assert_allclose(got[row], rhs / (1.0 + 0.25 * n_positive), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got[[2, 3]], 0.0)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("regularization,confidence", ALL_MODES)
def test_rows_without_a_positive_rating_get_exactly_zero(solver, regularization, confidence, caplog):
    """b = 0 for rows 2 and 3 (only negative ratings). CG from a warm start left ~1e-8 there, which
    cosine similarity scaled back to unit length (a returns-only item got similar items). Under count
    regularisation their lambda is 0, so with a rank-deficient Gramian their singular systems sent the
    whole batch to the pseudo-inverse, moving the other rows."""
    block = make_block(seed=5)
    block["src_factors"] = block["src_factors"].copy()
    block["src_factors"][:, -1] = 0.0
    block["src_gramian"] = gramian(block["src_factors"]) + np.diag([1.0] * (RANK - 1) + [0.0])
    params = SolveParams(alpha=2.0, reg_param=0.1, regularization=regularization, confidence=confidence,
                         solver=solver, cg_steps=3)
    assert np.all(block["init"][[2, 3]] != 0.0)
    with caplog.at_level(logging.WARNING, logger=solve.__name__):
        got = run(solve_block, block, params)
    assert "not positive definite" not in caplog.text
    np.testing.assert_array_equal(got[[0, 2, 3, 16]], 0.0)
    assert np.all(np.any(got[[1, 4, 5, 17]] != 0.0, axis=1))
    np.testing.assert_array_equal(run(reference_solve, block, params)[[0, 2, 3, 16]], 0.0)


def test_singular_systems_fall_back_to_least_squares(caplog):
    """reg_param = 0 with a src factor column that is all zero: A is singular, Cholesky fails."""
    block = make_block(seed=4)
    block["src_factors"] = block["src_factors"].copy()
    block["src_factors"][:, -1] = 0.0
    block["src_gramian"] = gramian(block["src_factors"])
    params = SolveParams(alpha=1.0, reg_param=0.0)
    with caplog.at_level(logging.WARNING, logger=solve.__name__):
        got = run(solve_block, block, params)
    assert "not positive definite" in caplog.text
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, run(reference_solve, block, params), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, -1], 0.0)  # minimum-norm: nothing along the null direction


def test_regularization_weights_per_mode():
    n_positive = np.array([0, 1, 4, 10])
    count = regularization_weights(n_positive, 100, SolveParams(reg_param=0.5, regularization="count"))
    np.testing.assert_allclose(count, [0.0, 0.5, 2.0, 5.0])
    constant = regularization_weights(n_positive, 100, SolveParams(reg_param=0.5, regularization="constant"))
    np.testing.assert_allclose(constant, [0.5] * 4)
    params = SolveParams(reg_param=0.5, regularization="frequency", frequency_alpha0=0.1, frequency_nu=0.5)
    frequency = regularization_weights(n_positive, 100, params)
    np.testing.assert_allclose(frequency, 0.5 * np.sqrt(n_positive + 10.0))
    for weights in (count, constant, frequency):
        assert weights.dtype == np.float64 and weights.shape == (4,)


def test_confidence_minus_one_per_mode():
    ratings = np.array([3.0, -2.0, 0.0, 0.5], dtype=np.float32)
    linear = confidence_minus_one(ratings, SolveParams(alpha=2.0))
    np.testing.assert_allclose(linear, [6.0, 4.0, 0.0, 1.0])
    log = confidence_minus_one(ratings, SolveParams(alpha=2.0, confidence="log", confidence_epsilon=0.5))
    np.testing.assert_allclose(log, 2.0 * np.log(1.0 + np.array([3.0, 2.0, 0.0, 0.5]) / 0.5))
    assert linear.dtype == log.dtype == np.float64


def test_gramian_accumulates_in_float64():
    factors = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float32)
    result = gramian(factors)
    assert result.dtype == np.float64 and result.shape == (5, 5)
    np.testing.assert_allclose(result, factors.astype(np.float64).T @ factors.astype(np.float64), rtol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(regularization="frequency", frequency_alpha0=-1.0, frequency_nu=0.5), "frequency_alpha0 and frequency_nu"),
    (dict(frequency_nu=-1.0), "frequency_alpha0 and frequency_nu"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(reg_param=float("inf")), "reg_param must be a finite number"),
])
def test_solve_params_refuse_values_that_give_nan_factors(bad, message):
    """frequencyAlpha0=-1 with frequencyNu=0.5 (or a NaN alpha) trained an all-NaN model without a word."""
    with pytest.raises(ValueError, match=message):
        SolveParams(**bad)


def test_input_errors_name_the_argument():
    block = make_block()
    with pytest.raises(ValueError, match="init"):
        solve_block(
            block["indptr"], block["indices"], block["ratings"], block["src_factors"],
            block["src_gramian"], N_SRC_TOTAL, SolveParams(solver="cg"),
        )  # fmt: skip
    with pytest.raises(ValueError, match="src_gramian"):
        solve_block(
            block["indptr"], block["indices"], block["ratings"], block["src_factors"],
            np.eye(RANK + 1), N_SRC_TOTAL, SolveParams(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="indices"):
        bad = block["indices"].copy()
        bad[0] = N_SRC_LOCAL
        solve_block(
            block["indptr"], bad, block["ratings"], block["src_factors"], block["src_gramian"],
            N_SRC_TOTAL, SolveParams(),
        )  # fmt: skip


def dense_objective(
    ratings_dense: np.ndarray, users: np.ndarray, items: np.ndarray, params: SolveParams
) -> tuple[float, float, float]:
    """Brute force over every (user, item) pair of a dense rating matrix (0 = unobserved).

    Returns ``(data_term, user_regularization, item_regularization)``.
    """
    observed = ratings_dense != 0
    confidence = np.where(observed, 1.0 + confidence_minus_one(ratings_dense, params), 1.0)
    preference = (ratings_dense > 0).astype(np.float64)
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    data = float(np.sum(confidence * (preference - scores) ** 2))
    lam_users = regularization_weights((ratings_dense > 0).sum(axis=1), items.shape[0], params)
    lam_items = regularization_weights((ratings_dense > 0).sum(axis=0), users.shape[0], params)
    user_reg = float(np.sum(lam_users * np.sum(users.astype(np.float64) ** 2, axis=1)))
    item_reg = float(np.sum(lam_items * np.sum(items.astype(np.float64) ** 2, axis=1)))
    return data, user_reg, item_reg


def random_dense_ratings(n_users: int, n_items: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 5, size=(n_users, n_items)).astype(np.float32)
    dense[rng.random((n_users, n_items)) < 0.7] = 0.0
    dense[rng.random((n_users, n_items)) < 0.05] *= -1
    dense[0] = 0.0
    dense[0, :3] = [-1.0, -2.0, 0.0]  # a user with only negative ratings
    return dense


def to_csr(dense: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of ``dense[:, columns]`` with column indices local to ``columns``."""
    local = dense[:, columns]
    rows, cols = np.nonzero(local)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[0]))]).astype(np.int64)
    return indptr, cols.astype(np.int32), local[rows, cols].astype(np.float32)


@pytest.mark.parametrize("regularization,confidence", ALL_MODES)
def test_block_loss_matches_brute_force(regularization, confidence):
    dense = random_dense_ratings(9, 12, seed=7)
    rng = np.random.default_rng(8)
    users = rng.standard_normal((9, 4)).astype(np.float32)
    items = rng.standard_normal((12, 4)).astype(np.float32)
    params = SolveParams(alpha=1.5, reg_param=0.3, regularization=regularization, confidence=confidence)
    # The block only holds the items some of its users rated; the Gramian covers all 12 items.
    local_items = np.flatnonzero(np.any(dense != 0, axis=0))
    indptr, indices, values = to_csr(dense, local_items)
    data, user_reg = block_loss(
        indptr, indices, values, users, items[local_items], gramian(items), 12, params
    )
    expected_data, expected_user_reg, expected_item_reg = dense_objective(dense, users, items, params)
    assert data == pytest.approx(expected_data, rel=1e-9)
    assert user_reg == pytest.approx(expected_user_reg, rel=1e-9)
    item_reg = regularization_loss((dense > 0).sum(axis=0), items, 9, params)
    assert item_reg == pytest.approx(expected_item_reg, rel=1e-9)


def als_dense(
    dense: np.ndarray, rank: int, params: SolveParams, half_steps: int, seed: int = 0
) -> list[float]:
    """Tiny ALS from the kernels, users and items each one block; the full objective after each half-step."""
    rng = np.random.default_rng(seed)
    users = (rng.standard_normal((dense.shape[0], rank)) * 0.1).astype(np.float32)
    items = (rng.standard_normal((dense.shape[1], rank)) * 0.1).astype(np.float32)
    by_user = to_csr(dense, np.arange(dense.shape[1]))
    by_item = to_csr(dense.T, np.arange(dense.shape[0]))

    def objective() -> float:
        data, user_reg = block_loss(*by_user, users, items, gramian(items), len(items), params)
        return data + user_reg + regularization_loss((dense > 0).sum(axis=0), items, len(users), params)

    losses = [objective()]
    for step in range(half_steps):
        if step % 2 == 0:
            items = solve_block(*by_item, users, gramian(users), len(users), params, items)
        else:
            users = solve_block(*by_user, items, gramian(items), len(items), params, users)
        losses.append(objective())
    return losses


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("regularization", ["count", "constant", "frequency"])
def test_alternating_half_steps_decrease_the_objective(solver, regularization):
    dense = random_dense_ratings(15, 11, seed=11)
    params = SolveParams(alpha=2.0, reg_param=0.1, regularization=regularization, solver=solver)
    losses = als_dense(dense, rank=3, params=params, half_steps=8)
    # Each half-step minimises (cholesky) or decreases (CG steps on a convex quadratic) the objective
    # in the solved side; float32 storage of the factors allows a rounding-sized rise.
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("regularization,confidence", ALL_MODES)
def test_objective_from_the_solver_equals_block_loss(solver, regularization, confidence, batch_bytes):
    """The objective the Spark layer reports comes from the solver's residuals, not a second pass over the
    ratings: it must equal the brute-force block loss of the factors it returns."""
    block = make_block(seed=3)
    params = SolveParams(alpha=1.5, reg_param=0.2, regularization=regularization, confidence=confidence,
                         solver=solver, cg_steps=2)
    factors, objective = run(solve.solve_block_with_objective, block, params)
    np.testing.assert_array_equal(factors, run(solve_block, block, params))
    data, reg = block_loss(block["indptr"], block["indices"], block["ratings"], factors, block["src_factors"],
                           block["src_gramian"], N_SRC_TOTAL, params)
    assert objective == pytest.approx(data + reg, rel=1e-6)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_a_zero_rating_is_not_a_preference(solver):
    """p = (r > 0): make_block never produced a zero, so `r >= 0` in the right-hand side went unnoticed."""
    block = make_block(seed=1)
    block["ratings"] = block["ratings"].copy()
    block["ratings"][block["indptr"][[4, 9]]] = 0.0
    params = SolveParams(alpha=3.0, reg_param=0.07, solver=solver)
    np.testing.assert_allclose(run(solve_block, block, params), run(reference_solve, block, params),
                               rtol=1e-4, atol=1e-6)
