"""How sure is the tuned comparison? Paired bootstrap of ImplicitALS minus MLlib ALS over test users.

    .venv/bin/python benchmarks/paired_difference.py

The quality runs report one mean per model. This script retrains, on the same split and with the
parameters each search chose there (read from the runs' JSON; nothing is chosen here), ImplicitALS under
both budget rules and MLlib ALS, checks that the means reproduce the reported ones, and resamples the test
users (a paired bootstrap: both models are scored on the same resampled users) to put a 95% interval on
ImplicitALS minus MLlib for NDCG@20 and Recall@20. Last.fm's criterion is the mean over outer splits 7, 8
and 9, so its users are resampled within each split and the three split means averaged.

Writes ``results/paired_difference.json`` and ``results/paired_difference.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import OUTER_SPLIT_SEEDS, load, quality_session, run_name, split_of  # noqa: E402
from mf_spark.cli import setup_logging  # noqa: E402

METRICS = ("ndcg@20", "recall@20")
RULES = ("trials", "compute")
# the runs of each data set, by split seed: Last.fm is judged on three outer splits with three
# validation splits each, MovieLens on its one temporal split (validated on one split)
RUNS = {
    "lastfm-2k": {
        seed: {rule: run_name("lastfm-2k", 3, seed, rule) for rule in RULES} for seed in OUTER_SPLIT_SEEDS
    },
    "ml-latest-small": {None: {rule: run_name("ml-latest-small", 1, 7, rule) for rule in RULES}},
}


def bootstrap_difference(
    differences: list[np.ndarray], reps: int, seed: int = 0
) -> dict[str, float]:
    """Mean over splits of each split's mean per-user difference, and its paired bootstrap.

    Parameters
    ----------
    differences
        One array per split: ImplicitALS's value minus MLlib's for every test user of that split.
    reps
        Bootstrap resamples; each draws every split's users with replacement, independently per split.

    Returns
    -------
    dict
        ``mean``, ``low`` and ``high`` (the 2.5% and 97.5% percentiles), ``share_at_least_zero``, the
        fraction of resamples in which ImplicitALS is at least as good, and ``normal_low`` /
        ``normal_high``, the normal-approximation interval of the evaluation report, for comparison.
    """
    rng = np.random.default_rng(seed)
    resampled = np.zeros(reps)
    for values in differences:
        draws = rng.integers(0, len(values), size=(reps, len(values)))
        resampled += values[draws].mean(axis=1)
    resampled /= len(differences)
    low, high = np.percentile(resampled, [2.5, 97.5])
    from mf_spark.evaluate.metrics import Z_95

    mean = float(np.mean([v.mean() for v in differences]))
    # the normal interval the evaluation report gives (mf_spark.evaluate.metrics.paired_differences),
    # for the mean of split means: variance sum(var_i / n_i) / splits**2
    standard_error = np.sqrt(sum(v.var(ddof=1) / len(v) for v in differences)) / len(differences)
    return {
        "mean": mean,
        "low": float(low),
        "high": float(high),
        "share_at_least_zero": float(np.mean(resampled >= 0)),
        "normal_low": float(mean - Z_95 * standard_error),
        "normal_high": float(mean + Z_95 * standard_error),
    }


def per_user_values(train, relevant, run: dict, model: str) -> tuple[dict[str, np.ndarray], dict]:
    """Retrain ``model`` on ``train`` (``run``'s split) with the parameters ``run`` chose; per-user NDCG@20
    and Recall@20 on ``relevant`` ordered by user, and the means next to the ones ``run`` reports."""
    from mf_spark.evaluate.metrics import per_user_metrics
    from mf_spark.evaluate.models import TrainParams, recommend_for_users

    users = relevant.select("user_idx").distinct()
    params = TrainParams.from_mapping(run["models"][model]["params"])
    fitted = recommend_for_users(model, train, users, 20, params, mllib_loss=False)
    rows = per_user_metrics(fitted.recommendations, relevant, [20]).select("user_idx", *METRICS)
    frame = rows.toPandas().sort_values("user_idx")
    fitted.release()
    values = {m: frame[m].to_numpy() for m in METRICS}
    reported = run["models"][model]["metrics"]
    check = {m: {"reproduced": float(values[m].mean()), "reported": reported[m]} for m in METRICS}
    return {"user_idx": frame["user_idx"].to_numpy(), **values}, check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args(argv)
    setup_logging("WARN")
    results = Path(args.results)
    needed = [
        results / f"{name}.json"
        for runs in RUNS.values()
        for by_rule in runs.values()
        for name in by_rule.values()
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"error: quality run results not found: {', '.join(missing)}", file=sys.stderr)
        return 3
    absent = [d for d in RUNS if not (Path(args.data_root) / d).is_dir()]
    if absent:
        print(f"error: data set(s) not found under {args.data_root}: {', '.join(absent)}", file=sys.stderr)
        return 3

    started = time.perf_counter()
    spark = quality_session("mf-spark-paired-difference")
    out: dict = {"reps": args.reps, "bootstrap_seed": 0, "datasets": {}}
    try:
        for dataset, runs in RUNS.items():
            interactions = load(spark, Path(args.data_root), dataset).persist()
            differences = {rule: {m: [] for m in METRICS} for rule in RULES}
            checks = []
            for split_seed, by_rule in runs.items():
                loaded = {
                    rule: json.loads((results / f"{name}.json").read_text()) for rule, name in by_rule.items()
                }
                if loaded["compute"]["split"] != loaded["trials"]["split"]:
                    raise RuntimeError(f"{dataset} split {split_seed}: the two rules' runs used other splits")
                split = split_of(interactions, loaded["trials"])
                train, relevant = split.train.persist(), split.relevant.persist()
                # MLlib's search is the same under both rules (the compute run reuses it): train it once
                mllib, check = per_user_values(train, relevant, loaded["trials"], "mllib_als")
                checks.append({"split_seed": split_seed, "model": "mllib_als", **check})
                for rule in RULES:
                    ours, check = per_user_values(train, relevant, loaded[rule], "implicit_als")
                    checks.append({"split_seed": split_seed, "rule": rule, "model": "implicit_als", **check})
                    if not np.array_equal(ours["user_idx"], mllib["user_idx"]):
                        raise RuntimeError(f"{dataset} split {split_seed}: models scored on other users")
                    for m in METRICS:
                        differences[rule][m].append(ours[m] - mllib[m])
                train.unpersist()
                relevant.unpersist()
            interactions.unpersist()
            out["datasets"][dataset] = {
                "splits": list(runs),
                "test_users": [len(d) for d in differences["trials"]["ndcg@20"]],
                "reproduction": checks,
                "difference": {
                    rule: {m: bootstrap_difference(differences[rule][m], args.reps) for m in METRICS}
                    for rule in RULES
                },
            }
    finally:
        spark.stop()
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (results / "paired_difference.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "paired_difference.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = [
        "### ImplicitALS minus MLlib ALS on test: paired bootstrap over test users",
        "",
        "| data set | budget rule | NDCG@20 difference [95% interval] | resamples >= 0 "
        "| Recall@20 difference [95% interval] | resamples >= 0 | normal intervals (NDCG, Recall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, result in out["datasets"].items():
        for rule, by_metric in result["difference"].items():
            cells = []
            for m in METRICS:
                d = by_metric[m]
                cells += [
                    f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]",
                    f"{d['share_at_least_zero']:.0%}",
                ]
            cells.append(", ".join(
                f"[{by_metric[m]['normal_low']:+.4f}, {by_metric[m]['normal_high']:+.4f}]" for m in METRICS
            ))
            lines.append(f"| {dataset} | equal {rule} | " + " | ".join(cells) + " |")
    worst = max(
        abs(c[m]["reproduced"] - c[m]["reported"])
        for result in out["datasets"].values()
        for c in result["reproduction"]
        for m in METRICS
    )
    lines += [
        "",
        f"Each model retrained with the parameters its search chose in the quality runs; the means reproduce "
        f"the reported ones within {worst:.1e}. Last.fm: users resampled within each of outer splits "
        f"{', '.join(str(s) for s in out['datasets'].get('lastfm-2k', {}).get('splits', []))}, "
        f"the three split means averaged (the criterion's statistic). {out['reps']} resamples, seed "
        f"{out['bootstrap_seed']}.",
        "Produced by `python benchmarks/paired_difference.py`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
