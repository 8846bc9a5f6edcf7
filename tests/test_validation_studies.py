"""The validation-only studies in benchmarks/: their numpy reference is ImplicitALS's model at beta = 0,
and its popularity-weighted variant solves the objective it states."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import missing_weight_study  # noqa: E402
import validation_study  # noqa: E402

from mf_spark.als.params import SolveParams  # noqa: E402
from mf_spark.als.solve import gramian, solve_block  # noqa: E402


def _problem(seed: int = 3, users: int = 12, items: int = 9, rank: int = 4):
    rng = np.random.default_rng(seed)
    mask = rng.random((users, items)) < 0.4
    mask[:, 0] = True  # no empty item column
    plays = np.where(mask, rng.integers(1, 50, (users, items)), 0).astype(np.float64)
    strength = sp.csr_matrix(plays)
    confidence = strength.copy()
    confidence.data = 1 + 0.7 * np.log1p(confidence.data)
    return strength, confidence, rng.normal(size=(items, rank)), rng.normal(size=(users, rank))


def test_missing_weights_are_uniform_at_beta_zero_and_average_one():
    counts = np.array([1, 4, 9, 100])
    assert missing_weight_study.missing_weights(counts, 0.0) == pytest.approx(np.ones(4))
    for beta in (-0.25, 0.5):
        weights = missing_weight_study.missing_weights(counts, beta)
        assert weights.mean() == pytest.approx(1.0)
        assert np.all(np.diff(weights) > 0) == (beta > 0)


def test_beta_zero_is_implicit_als_half_step():
    strength, confidence, item_factors, user_factors = _problem()
    params = SolveParams(alpha=0.7, reg_param=0.3, confidence="log", solver="cholesky")
    uniform = np.ones(strength.shape[1])  # one missing weight per item
    every_user = np.ones(strength.shape[0])
    users_solved = missing_weight_study.solve_side(confidence, item_factors, uniform, every_user, 0.3)
    expected = solve_block(
        strength.indptr, strength.indices, strength.data.astype(np.float32), item_factors.astype(np.float32),
        gramian(item_factors.astype(np.float32)), strength.shape[1], params,
    )
    np.testing.assert_allclose(users_solved, expected, rtol=1e-4, atol=1e-5)
    strength_t, confidence_t = strength.T.tocsr(), confidence.T.tocsr()
    items_solved = missing_weight_study.solve_side(confidence_t, user_factors, every_user, uniform, 0.3)
    expected = solve_block(
        strength_t.indptr, strength_t.indices, strength_t.data.astype(np.float32),
        user_factors.astype(np.float32), gramian(user_factors.astype(np.float32)), strength.shape[0], params,
    )
    np.testing.assert_allclose(items_solved, expected, rtol=1e-4, atol=1e-5)


def test_weighted_solves_minimise_the_stated_objective():
    # dense form of the objective: weight c_ui on observed pairs (target 1), w_i on missing ones (target 0)
    strength, confidence, item_factors, user_factors = _problem(seed=5)
    weights = missing_weight_study.missing_weights(np.diff(confidence.T.tocsr().indptr), 0.5)
    dense_c = confidence.toarray()
    observed = dense_c > 0
    pair_weight = np.where(observed, dense_c, weights[None, :])
    every_user = np.ones(strength.shape[0])
    reg, rank = 0.3, item_factors.shape[1]
    users_solved = missing_weight_study.solve_side(confidence, item_factors, weights, every_user, reg)
    for u in range(strength.shape[0]):
        a = (item_factors * pair_weight[u][:, None]).T @ item_factors + reg * observed[u].sum() * np.eye(rank)
        b = (item_factors * (pair_weight[u] * observed[u])[:, None]).sum(0)
        np.testing.assert_allclose(users_solved[u], np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    by_item = confidence.T.tocsr()
    items_solved = missing_weight_study.solve_side(by_item, user_factors, every_user, weights, reg)
    for i in range(strength.shape[1]):
        col = pair_weight[:, i]
        a = (user_factors * col[:, None]).T @ user_factors + reg * observed[:, i].sum() * np.eye(rank)
        b = (user_factors * (col * observed[:, i])[:, None]).sum(0)
        np.testing.assert_allclose(items_solved[i], np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


def test_top_k_leaves_out_seen_items_and_sorts_by_score():
    user_factors = np.array([[1.0], [-1.0]])
    item_factors = np.array([[3.0], [1.0], [2.0], [-1.0]])
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 1]]))
    assert missing_weight_study.top_k(user_factors, item_factors, seen, 2).tolist() == [[2, 1], [1, 2]]


@pytest.mark.parametrize("study", [validation_study, missing_weight_study])
def test_studies_refuse_a_missing_data_set(study, tmp_path, capsys):
    assert study.main(["--data-root", str(tmp_path)]) == 3
    assert "data set not found" in capsys.readouterr().err


def test_validation_study_refuses_bad_json(tmp_path, capsys):
    (tmp_path / "lastfm-2k").mkdir()
    assert validation_study.main(["--data-root", str(tmp_path), "--variant", "{max_iter: 20}"]) == 2
    assert "JSON" in capsys.readouterr().err


def test_paired_bootstrap_averages_split_means_and_brackets_the_mean():
    import paired_difference

    constant = paired_difference.bootstrap_difference([np.full(5, 0.01), np.full(50, -0.03)], reps=200)
    # split means 0.01 and -0.03 weigh equally, whatever the splits' sizes
    assert constant == pytest.approx({"mean": -0.01, "low": -0.01, "high": -0.01, "share_at_least_zero": 0.0,
                                      "normal_low": -0.01, "normal_high": -0.01})
    rng = np.random.default_rng(1)
    noisy = [rng.normal(0.002, 0.05, 2000) for _ in range(3)]
    first = paired_difference.bootstrap_difference(noisy, reps=500)
    assert first == paired_difference.bootstrap_difference(noisy, reps=500)  # seeded
    assert first["low"] < first["mean"] < first["high"]
    # standard error of the mean of three split means: 0.05 / sqrt(3 * 2000)
    assert first["high"] - first["low"] == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(6000), rel=0.15)
    normal_width = first["normal_high"] - first["normal_low"]
    assert normal_width == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(6000), rel=0.05)
    assert 0 < first["share_at_least_zero"] < 1


def test_paired_difference_refuses_missing_runs(tmp_path, capsys):
    import paired_difference

    assert paired_difference.main(["--results", str(tmp_path)]) == 3
    assert "quality run results not found" in capsys.readouterr().err
