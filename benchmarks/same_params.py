"""ImplicitALS and MLlib ALS at one parameter set: is a quality gap the model or the initial factors?

    .venv/bin/python benchmarks/same_params.py                     # Last.fm, MLlib's tuned winner
    .venv/bin/python benchmarks/same_params.py --seeds 20

On the Last.fm test split of ``benchmarks/quality.py`` (seed 7) with MLlib's tuned parameters there
(rank 64, reg_param 0.3, alpha 0.3, log confidence, 10 iterations):

1. both models from MLlib's own initial factors (its ``maxIter=0`` model; ImplicitALS takes them as a
   warm start): the test NDCG@20 / Recall@20 and the objective of MLlib, ImplicitALS Cholesky and
   ImplicitALS CG;
2. each model from its own draw of initial factors for ``--seeds`` seeds (100, 101, ...): the mean,
   standard deviation and range of the test metrics.

Writes ``benchmarks/results/same_params_lastfm-2k.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PARAMS = {"rank": 64, "reg_param": 0.3, "alpha": 0.3, "confidence": "log"}
FIRST_SEED = 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 (a standard deviation needs two draws), got {args.seeds}")
    if not (Path(args.data_root) / "lastfm-2k").is_dir():
        print(f"error: lastfm-2k not found under {args.data_root}", file=sys.stderr)
        return 3

    import quality
    from pyspark.ml.recommendation import ALS

    from mf_spark import ImplicitALS, ImplicitALSModel
    from mf_spark.evaluate.metrics import ranking_metrics
    from mf_spark.evaluate.models import (
        TrainParams,
        _mllib_ratings,
        lists_from_factors,
        mllib_objective,
        recommend_for_users,
    )
    from mf_spark.evaluate.splits import make_split
    from mf_spark.session import build_session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    started = time.perf_counter()
    spark = build_session(
        "mf-spark-same-params",
        {"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "3g", "spark.ui.showConsoleProgress": "false"},
        master="local[2]",
        checkpoint_dir=tempfile.mkdtemp(prefix="mf-spark-same-params-"),
        log_level="ERROR",
    )
    try:
        interactions = quality.load(spark, Path(args.data_root), "lastfm-2k").persist()
        split = make_split(interactions, "user_random", test_fraction=0.2, test_n=0, seed=quality.SPLIT_SEED)
        train, relevant = split.train.persist(), split.relevant.persist()
        users = relevant.select("user_idx").distinct()
        seen = train.select("user_idx", "item_idx")
        params = TrainParams.from_mapping({**quality.BASE_PARAMS, **PARAMS})

        def test_metrics(user_factors, item_factors) -> dict:
            m = ranking_metrics(lists_from_factors(user_factors, item_factors, users, 20, seen), relevant, [20])
            return {"ndcg@20": m["ndcg@20"], "recall@20": m["recall@20"]}

        # 1. one start for both: MLlib's initial factors
        mllib_train = _mllib_ratings(train, params)
        init = ALS(implicitPrefs=True, **params.replace(max_iter=0).als_params()).fit(mllib_train)
        start = ImplicitALSModel(rank=params.rank, userFactors=init.userFactors.cache(),
                                 itemFactors=init.itemFactors.cache())
        mllib = ALS(implicitPrefs=True, **params.als_params()).fit(mllib_train)
        common = {"mllib_als": {**test_metrics(mllib.userFactors, mllib.itemFactors),
                                "objective": mllib_objective(train, mllib.userFactors, mllib.itemFactors, params)}}
        for solver in ("cholesky", "cg"):
            fitted = ImplicitALS(**params.replace(solver=solver).implicit_als_params(), initialModel=start).fit(train)
            common[f"implicit_als_{solver}"] = {**test_metrics(fitted.userFactors, fitted.itemFactors),
                                                "objective": float(fitted.trainingLoss[-1])}
            print(solver, common[f"implicit_als_{solver}"], flush=True)

        # 2. each model from its own draws
        own: dict[str, list[dict]] = {"implicit_als_cholesky": [], "mllib_als": []}
        seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
        for seed in seeds:
            for model in own:
                run = recommend_for_users(model, train, users, 20, params.replace(seed=seed), mllib_loss=False)
                metrics = ranking_metrics(run.recommendations, relevant, [20])
                run.release()
                own[model].append({"ndcg@20": metrics["ndcg@20"], "recall@20": metrics["recall@20"]})
                print(seed, model, own[model][-1], flush=True)
    finally:
        spark.stop()

    spread = {
        model: {
            key: {
                "mean": statistics.fmean(r[key] for r in rows),
                "sd": statistics.stdev(r[key] for r in rows),
                "min": min(r[key] for r in rows),
                "max": max(r[key] for r in rows),
            }
            for key in ("ndcg@20", "recall@20")
        }
        for model, rows in own.items()
    }
    wins = sum(a["ndcg@20"] > b["ndcg@20"] for a, b in zip(own["implicit_als_cholesky"], own["mllib_als"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"params": PARAMS, "max_iter": params.max_iter, "split_seed": quality.SPLIT_SEED,
              "from_mllib_initial_factors": common, "seeds": seeds, "own_initial_factors": own,
              "own_initial_factors_summary": spread, "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "same_params_lastfm-2k.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "### lastfm-2k: one parameter set (rank 64, reg_param 0.3, alpha 0.3, log confidence, 10 iterations)",
        "",
        "From MLlib's own initial factors (ImplicitALS warm-started with MLlib's `maxIter=0` model):",
        "",
        "| model | NDCG@20 | Recall@20 | objective |",
        "|---|---|---|---|",
        *[f"| {m} | {v['ndcg@20']:.4f} | {v['recall@20']:.4f} | {v['objective']:,.1f} |" for m, v in common.items()],
        "",
        f"Each from its own initial factors, seeds {seeds[0]}-{seeds[-1]}: mean ± sd [min, max] on test.",
        "",
        "| model | NDCG@20 | Recall@20 |",
        "|---|---|---|",
    ]
    for model, s in spread.items():
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['sd']:.4f} [{s[k]['min']:.4f}, {s[k]['max']:.4f}]"
                 for k in ("ndcg@20", "recall@20")]
        lines.append(f"| {model} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"ImplicitALS ahead on NDCG@20 for {wins} of {len(seeds)} seeds. Wall time "
        f"{result['wall_seconds'] / 60:.1f} min, Python {platform.python_version()}.",
        "Produced by `python benchmarks/same_params.py" + ("" if args.seeds == 10 else f" --seeds {args.seeds}") + "`.",
        "",
    ]
    (out / "same_params_lastfm-2k.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
