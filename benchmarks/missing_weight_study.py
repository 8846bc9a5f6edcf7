"""Validation-only study: does weighting the missing entries by item popularity (eALS) help on Last.fm?

    .venv/bin/python benchmarks/missing_weight_study.py --betas 0,-0.1,-0.25,0.25,0.5

He et al. 2016 ("Fast Matrix Factorization for Online Recommendation with Implicit Feedback", eALS)
replace Hu et al.'s uniform weight 1 on unobserved user-item pairs by a per-item weight
``w_i proportional to f_i**beta`` (``f_i`` the item's count of training users), scaled here to a mean of 1
so ``beta = 0`` is exactly Hu et al.'s model. MLlib cannot express it, so a gain here would be a modelling
advantage ImplicitALS could add. This is a plain numpy reference (exact solves, as ``mf_spark.als.solve``'s
reference solver) of that objective with log confidence ``c = 1 + alpha*log(1 + r)`` and MLlib's
count-scaled regularisation, run on the validation splits ``quality.py`` tunes on (the test part is never
read), scored by the project's Spark metrics. ``beta = 0`` is also a check that the reference is the
model ImplicitALS trains (``validation_study.py`` gives ImplicitALS's value at the same parameters).

Per user ``u`` (items symmetric, with the item's own weight on every missing user)::

    x_u = (Y^T W Y + sum_{i in I_u} (c_ui - w_i) y_i y_i^T + lambda * n_u * I)^{-1} sum_{i in I_u} c_ui y_i

Writes ``results/validation_study_missing-weights.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import quality_session  # noqa: E402
from benchmarks.validation_study import MLLIB_LASTFM_WINNER, validation_frames  # noqa: E402
from mf_spark.cli import setup_logging  # noqa: E402


def missing_weights(item_counts: np.ndarray, beta: float) -> np.ndarray:
    """Per-item weight of the unobserved pairs, ``f_i**beta`` scaled to mean 1 (``beta = 0``: all 1)."""
    weights = item_counts.astype(np.float64) ** beta
    return weights * (len(weights) / weights.sum())


def solve_side(confidence: sp.csr_matrix, fixed: np.ndarray, fixed_weights: np.ndarray,
               row_weights: np.ndarray, reg_param: float) -> np.ndarray:
    """Exact weighted least squares for every row of ``confidence`` (rows x fixed entities, data = c).

    The missing pair (row, j) weighs ``row_weights[row] * fixed_weights[j]``: item weights as
    ``fixed_weights`` and ones as ``row_weights`` in a user solve, the other way round in an item solve."""
    rank = fixed.shape[1]
    gramian = (fixed * fixed_weights[:, None]).T @ fixed
    out = np.zeros((confidence.shape[0], rank))
    for row in range(confidence.shape[0]):
        lo, hi = confidence.indptr[row], confidence.indptr[row + 1]
        if lo == hi:
            continue
        cols, c = confidence.indices[lo:hi], confidence.data[lo:hi]
        factors = fixed[cols]
        missing = row_weights[row] * fixed_weights[cols]
        a = row_weights[row] * gramian + (factors * (c - missing)[:, None]).T @ factors
        a[np.diag_indices(rank)] += reg_param * (hi - lo)
        out[row] = np.linalg.solve(a, factors.T @ c)
    return out


def fit(strength: sp.csr_matrix, *, rank: int, reg_param: float, alpha: float, beta: float,
        max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """User and item factors (n_users x rank, n_items x rank) of the eALS-weighted objective."""
    rng = np.random.default_rng(seed)
    users, items = strength.shape
    user_factors = rng.normal(0, 1 / np.sqrt(rank), (users, rank))
    item_factors = rng.normal(0, 1 / np.sqrt(rank), (items, rank))
    confidence = strength.copy()
    confidence.data = 1 + alpha * np.log1p(confidence.data)
    confidence_t = confidence.T.tocsr()
    weights = missing_weights(np.diff(confidence_t.indptr), beta)
    for _ in range(max_iter):
        user_factors = solve_side(confidence, item_factors, weights, np.ones(users), reg_param)
        item_factors = solve_side(confidence_t, user_factors, np.ones(users), weights, reg_param)
    return user_factors, item_factors


def top_k(user_factors: np.ndarray, item_factors: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    scores = user_factors @ item_factors.T
    scores[seen.nonzero()] = -np.inf
    best = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, 1), axis=1, kind="stable")
    return np.take_along_axis(best, order, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--split-seed", type=int, default=7)
    parser.add_argument("--validation-splits", type=int, default=3)
    parser.add_argument("--betas", default="0,-0.1,-0.25,0.25,0.5")
    parser.add_argument("--seeds", default="42,1")
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARN")
    if not (Path(args.data_root) / "lastfm-2k").is_dir():
        print(f"error: data set not found: {Path(args.data_root) / 'lastfm-2k'}", file=sys.stderr)
        return 3
    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    params = {k: MLLIB_LASTFM_WINNER[k] for k in ("rank", "reg_param", "alpha")}

    from mf_spark.evaluate.metrics import ranking_metrics

    spark = quality_session("mf-spark-missing-weight-study")
    rows = {beta: {"ndcg@20": [], "recall@20": []} for beta in betas}
    try:
        for train, relevant in validation_frames(
            spark, Path(args.data_root), "lastfm-2k", args.split_seed, args.validation_splits
        ):
            pairs = train.select("user_idx", "item_idx", "strength").toPandas()
            user_ids, user_pos = np.unique(pairs["user_idx"].to_numpy(), return_inverse=True)
            item_ids, item_pos = np.unique(pairs["item_idx"].to_numpy(), return_inverse=True)
            strength = sp.csr_matrix(
                (pairs["strength"].to_numpy(np.float64), (user_pos, item_pos)), (len(user_ids), len(item_ids))
            )
            for beta in betas:
                per_seed = {"ndcg@20": [], "recall@20": []}
                for seed in seeds:
                    started = time.perf_counter()
                    x, y = fit(strength, **params, beta=beta, max_iter=args.max_iter, seed=seed)
                    best = top_k(x, y, strength, 20)
                    recs = spark.createDataFrame(
                        [
                            (int(user_ids[u]), rank + 1, int(item_ids[best[u, rank]]))
                            for u in range(len(user_ids))
                            for rank in range(20)
                        ],
                        "user_idx int, rank int, item_idx int",
                    )
                    metrics = ranking_metrics(recs, relevant, [20])
                    for key in per_seed:
                        per_seed[key].append(metrics[key])
                    print(f"beta {beta:+.2f} seed {seed}: NDCG@20 {metrics['ndcg@20']:.4f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                for key in per_seed:
                    rows[beta][key].append(per_seed[key])
    finally:
        spark.stop()
    variants = []
    for beta, values in rows.items():
        # mean over validation splits, per seed (the same layout as validation_study.py)
        by_seed = {key: [statistics.fmean(split[i] for split in v) for i in range(len(seeds))]
                   for key, v in values.items()}
        variants.append({"overrides": {"missing_weight_beta": beta}, **by_seed})
        print(f"beta {beta:+.2f}: NDCG@20 {statistics.fmean(by_seed['ndcg@20']):.4f} "
              f"Recall@20 {statistics.fmean(by_seed['recall@20']):.4f}")
    out = Path(args.out) / "validation_study_missing-weights.json"
    out.write_text(json.dumps({
        "dataset": "lastfm-2k",
        "split_seed": args.split_seed,
        "validation_splits": args.validation_splits,
        "seeds": seeds,
        "base": {**params, "confidence": "log", "regularization": "count", "max_iter": args.max_iter,
                 "solver": "numpy reference (exact)"},
        "variants": variants,
        "command": "python benchmarks/missing_weight_study.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
