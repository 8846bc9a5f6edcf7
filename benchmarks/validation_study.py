"""Validation-only study of ImplicitALS variants around one parameter set, never touching the test part.

    .venv/bin/python benchmarks/validation_study.py --dataset lastfm-2k \
        --variant '{}' --variant '{"max_iter": 20}'

Carves the same validation splits as ``quality.py`` (outer split seed, then ``--validation-splits``
holdouts of its training part) and scores each variant (overrides of ``--base``, by default MLlib's tuned
winner on Last.fm) by NDCG@20 and Recall@20 with several seeds of the initial factors. It answers "does
this change help the model?" before any comparison on test is planned, so that a rule for that
comparison can be fixed without having seen test numbers. Writes ``results/validation_study_<name>.json``
and prints a table with every seed's value and fit seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import BASE_PARAMS, SPLITS, load, quality_session  # noqa: E402
from mf_spark.cli import setup_logging  # noqa: E402

MLLIB_LASTFM_WINNER = {"rank": 64, "reg_param": 0.3, "alpha": 0.3, "confidence": "log"}


def validation_frames(spark, data_root: Path, dataset: str, split_seed: int, count: int) -> list[tuple]:
    """(train, relevant) of the validation splits ``quality.py`` tunes on for this outer split, persisted:
    carved from the outer split's training part only, so the test part is never read."""
    from mf_spark.evaluate.splits import make_split
    from mf_spark.evaluate.tuning import validation_splits

    interactions = load(spark, data_root, dataset)
    outer = make_split(interactions, SPLITS[dataset], test_fraction=0.2, seed=split_seed)
    validations = validation_splits(outer, count, test_fraction=0.2, seed=split_seed)
    return [(v.train.persist(), v.relevant.persist()) for v in validations]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="lastfm-2k", choices=("lastfm-2k", "ml-latest-small"))
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--split-seed", type=int, default=7)
    parser.add_argument("--validation-splits", type=int, default=3)
    parser.add_argument("--seeds", default="42,1", help="seeds of the initial factors, comma-separated")
    parser.add_argument("--base", default=json.dumps(MLLIB_LASTFM_WINNER), help="JSON parameter overrides")
    parser.add_argument("--variant", action="append", default=[], help="JSON overrides of --base; repeat")
    parser.add_argument("--name", default="study", help="results file: results/validation_study_NAME.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARN")
    data_root = Path(args.data_root)
    if not (data_root / args.dataset).is_dir():
        print(f"error: data set not found: {data_root / args.dataset}", file=sys.stderr)
        return 3
    try:
        base = json.loads(args.base)
        variants = [json.loads(v) for v in args.variant] or [{}]
    except json.JSONDecodeError as err:
        print(f"error: --base/--variant must be JSON objects: {err}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]

    from mf_spark.evaluate.metrics import ranking_metrics
    from mf_spark.evaluate.models import TrainParams, recommend_for_users

    spark = quality_session("mf-spark-validation-study")
    rows = []
    try:
        frames = validation_frames(spark, data_root, args.dataset, args.split_seed, args.validation_splits)
        for overrides in variants:
            params = TrainParams.from_mapping({**BASE_PARAMS, **base, **overrides})
            # the evaluation's model names fix the solver: "implicit_als" is CG
            model = "implicit_als_cholesky" if params.solver == "cholesky" else "implicit_als"
            values: dict[str, list[float]] = {"ndcg@20": [], "recall@20": [], "fit_seconds": []}
            for seed in seeds:
                scores = {"ndcg@20": [], "recall@20": []}
                for train, relevant in frames:
                    users = relevant.select("user_idx").distinct()
                    run = recommend_for_users(
                        model, train, users, 20, params.replace(seed=seed), mllib_loss=False
                    )
                    metrics = ranking_metrics(run.recommendations, relevant, [20])
                    values["fit_seconds"].append(run.fit_seconds)
                    run.release()
                    for key in scores:
                        scores[key].append(metrics[key])
                for key in scores:
                    values[key].append(statistics.fmean(scores[key]))
            rows.append({"overrides": overrides, "model": model, **values})
            print(
                f"{json.dumps(overrides):50s} NDCG@20 {statistics.fmean(values['ndcg@20']):.4f} "
                f"{[round(v, 4) for v in values['ndcg@20']]} "
                f"Recall@20 {statistics.fmean(values['recall@20']):.4f} "
                f"fit {statistics.fmean(values['fit_seconds']):.1f} s",
                flush=True,
            )
    finally:
        spark.stop()
    out = Path(args.out) / f"validation_study_{args.name}.json"
    out.write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "split_seed": args.split_seed,
                "validation_splits": args.validation_splits,
                "seeds": seeds,
                "base": {**BASE_PARAMS, **base},
                "variants": rows,
                "command": "python benchmarks/validation_study.py "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
