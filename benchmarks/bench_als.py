"""ImplicitALS vs MLlib ALS(implicitPrefs=True): fit time, objective, ranking quality, peak memory, scaling.

Commands (run from the repo root with the project venv; OpenBLAS installed so MLlib uses native BLAS):

    .venv/bin/python benchmarks/bench_als.py compare --dataset synthetic-2m   # same app, both fits, quality
    .venv/bin/python benchmarks/bench_als.py compare --dataset lastfm-2k
    .venv/bin/python benchmarks/bench_als.py memory --dataset synthetic-2m --impl ours   # fresh process each
    .venv/bin/python benchmarks/bench_als.py memory --dataset synthetic-2m --impl mllib
    .venv/bin/python benchmarks/bench_als.py scale --sizes 1 4 16            # millions of interactions, ours
    .venv/bin/python benchmarks/bench_als.py scale --sizes 20 --driver-memory 8g
    .venv/bin/python benchmarks/bench_als.py scale --sizes 1 --broadcast-threshold 0   # routed, not broadcast

Every result is appended as one JSON line to benchmarks/results/als.jsonl (machine, date, command).
Hyperparameters as in the issue: rank 32, 10 iterations, alpha 10, regParam 0.1, local[2].
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from process_memory import MemoryPoller  # noqa: E402  (benchmarks/, the script's folder)

RESULTS = REPO / "benchmarks" / "results" / "als.jsonl"
DATA_DIR = Path(os.environ.get("MF_SPARK_BENCH_DATA", "/tmp/mf-spark-bench"))
SHARED = REPO.parent / "shared" / "data"
RANK, ITERS, ALPHA, REG = 32, 10, 10.0, 0.1


# --- data ---------------------------------------------------------------------------------------


def synthetic(n_interactions: int, n_users: int, n_items: int, seed: int = 0) -> pd.DataFrame:
    """Power-law users and items (Zipf-like exponents 0.8 and 1.0), duplicates merged, counts 1..∞."""
    rng = np.random.default_rng(seed)
    user_p = 1.0 / np.arange(1, n_users + 1) ** 0.8
    item_p = 1.0 / np.arange(1, n_items + 1) ** 1.0
    users = rng.choice(n_users, size=n_interactions, p=user_p / user_p.sum())
    items = rng.choice(n_items, size=n_interactions, p=item_p / item_p.sum())
    # shuffle ids so popularity is not aligned with the id order (and so with the blocks)
    users = rng.permutation(n_users)[users]
    items = rng.permutation(n_items)[items]
    frame = pd.DataFrame({"user": users.astype(np.int32), "item": items.astype(np.int32)})
    frame = frame.groupby(["user", "item"], sort=True).size().rename("rating").reset_index()
    frame["rating"] = frame["rating"].astype(np.float32)
    return frame


def dataset_path(name: str) -> Path:
    path = DATA_DIR / f"{name}.parquet"
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if name == "synthetic-2m":
        frame = synthetic(2_000_000, 100_000, 20_000)
    elif name.startswith("synthetic-") and name.endswith("m"):
        millions = int(name[len("synthetic-"):-1])
        frame = synthetic(millions * 1_000_000, 50_000 * millions, 10_000 * max(1, millions // 2), seed=millions)
    elif name == "lastfm-2k":
        src = SHARED / "lastfm-2k" / "user_artists.dat"
        if not src.exists():
            sys.exit(f"{src} not found: the Last.fm benchmark needs ../shared/data")
        raw = pd.read_csv(src, sep="\t")
        frame = pd.DataFrame({"user": raw["userID"].astype(np.int32), "item": raw["artistID"].astype(np.int32),
                              "rating": raw["weight"].astype(np.float32)})
        # play counts span 1..352,698: a log scale keeps alpha meaningful (as is usual for Last.fm)
        frame["rating"] = np.log1p(frame["rating"]).astype(np.float32)
    else:
        sys.exit(f"unknown dataset {name}")
    frame.to_parquet(path, index=False)
    return path


# --- measurement --------------------------------------------------------------------------------


def machine() -> dict:
    blas = "libblas.so.3 present" if Path("/usr/lib/x86_64-linux-gnu/libblas.so.3").exists() else "no libblas.so.3"
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "blas": blas, "load_average_1_5_15": list(os.getloadavg())}


def record(result: dict, results: Path = RESULTS, script: str = "benchmarks/bench_als.py") -> None:
    """Add date, machine, PySpark version and command to ``result``, append it to ``results``, print it."""
    import pyspark

    result.update({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                   "pyspark": pyspark.__version__, "command": " ".join([script, *sys.argv[1:]])})
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


def session(driver_memory: str):
    from mf_spark.session import build_session

    return build_session("mf-spark-bench-als", {
        "spark.driver.memory": driver_memory, "spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false",
        "spark.local.dir": str(DATA_DIR / "spark-local"),
    }, master="local[2]", checkpoint_dir=str(DATA_DIR / "checkpoints"), log_level="ERROR")


# --- fits ---------------------------------------------------------------------------------------


def fit(impl: str, train, blocks: int, solver: str = "cg"):
    from pyspark.ml.recommendation import ALS

    from mf_spark import ImplicitALS

    kw = dict(rank=RANK, maxIter=ITERS, regParam=REG, alpha=ALPHA, userCol="user", itemCol="item",
              ratingCol="rating", numUserBlocks=blocks, numItemBlocks=blocks, seed=42)
    t0 = time.perf_counter()
    if impl == "mllib":
        model = ALS(implicitPrefs=True, **kw).fit(train)
    else:
        model = ImplicitALS(solver=solver, **kw).fit(train)
    # both persist and count their factors inside fit (finalStorageLevel); force it anyway
    model.userFactors.count()
    model.itemFactors.count()
    return model, time.perf_counter() - t0


def ranking_quality(model, train, test, k: int = 20) -> dict:
    """Precision@10, recall@20 and NDCG@20 (binary gains) with training items excluded."""
    from pyspark.sql import functions as F

    from mf_spark.recommend import recommend_top_k

    recs = recommend_top_k(model.userFactors, model.itemFactors, k, seen=train, seen_src_col="user",
                           seen_dst_col="item")
    test_pairs = test.select(F.col("user").alias("src"), F.col("item").alias("dst")).withColumn("hit", F.lit(1))
    test_sizes = test.groupBy(F.col("user").alias("src")).agg(F.count("*").alias("n_test"))
    scored = recs.join(test_pairs, ["src", "dst"], "left").fillna(0, ["hit"])
    per_user = scored.groupBy("src").agg(
        F.sum(F.when(F.col("rank") <= 10, F.col("hit")).otherwise(0)).alias("hits10"),
        F.sum("hit").alias("hits20"),
        F.sum(F.col("hit") / F.log2(F.col("rank") + 1)).alias("dcg"),
    ).join(test_sizes, "src", "right").fillna(0)
    idcg = F.aggregate(F.sequence(F.lit(1), F.least(F.col("n_test"), F.lit(k))), F.lit(0.0),
                       lambda acc, r: acc + 1.0 / F.log2(r + 1))
    row = per_user.agg(F.avg(F.col("hits10") / 10).alias("p10"), F.avg(F.col("hits20") / F.col("n_test")).alias("r20"),
                       F.avg(F.col("dcg") / idcg).alias("ndcg20"), F.count("*").alias("users")).first()
    return {"precision@10": row.p10, "recall@20": row.r20, "ndcg@20": row.ndcg20, "test_users": row.users}


def split(spark, path: Path):
    """Per-pair 80/20 split by a hash of (user, item): deterministic, no sampling RNG."""
    from pyspark.sql import functions as F

    ratings = spark.read.parquet(str(path))
    bucket = F.abs(F.xxhash64("user", "item", F.lit(7))) % 100
    train = ratings.where(bucket >= 20).persist()
    test = ratings.where((bucket < 20) & (F.col("rating") > 0)).persist()
    return ratings, train, test


def cmd_compare(args) -> None:
    from mf_spark.als.blocks import select_ratings
    from mf_spark.als.params import SolveParams
    from mf_spark.als.train import objective

    spark = session(args.driver_memory)
    path = dataset_path(args.dataset)
    _, train, test = split(spark, path)
    n_train = train.count()
    test.count()
    result = {"benchmark": "als_compare", "dataset": args.dataset, "train_interactions": n_train,
              "users": train.select("user").distinct().count(), "items": train.select("item").distinct().count(),
              "rank": RANK, "iterations": ITERS, "alpha": ALPHA, "reg_param": REG, "blocks": args.blocks, "runs": {}}
    validated = select_ratings(train, "user", "item", "rating").persist()
    validated.count()
    params = SolveParams(alpha=ALPHA, reg_param=REG)
    order = ["mllib", "ours-cg", "ours-cholesky"] if not args.reverse else ["ours-cg", "ours-cholesky", "mllib"]
    for name in order:
        impl, solver = (name.split("-") + ["cg"])[:2] if name != "mllib" else ("mllib", "")
        seconds = []
        for _ in range(args.repeats):
            model, sec = fit(impl, train, args.blocks, solver or "cg")
            seconds.append(round(sec, 2))
        loss = objective(spark, validated, model.userFactors, model.itemFactors, params)
        quality = ranking_quality(model, train, test)
        result["runs"][name] = {"fit_seconds": seconds, "fit_seconds_min": min(seconds), "objective": loss, **quality}
        print(name, result["runs"][name], flush=True)
    mllib = result["runs"]["mllib"]["fit_seconds_min"]
    for name in ("ours-cg", "ours-cholesky"):
        result["runs"][name]["time_vs_mllib"] = round(result["runs"][name]["fit_seconds_min"] / mllib, 3)
        result["runs"][name]["objective_vs_mllib"] = round(result["runs"][name]["objective"] / result["runs"]["mllib"]["objective"], 4)
    record(result)
    spark.stop()


def cmd_memory(args) -> None:
    spark = session(args.driver_memory)
    _, train, _ = split(spark, dataset_path(args.dataset))
    train.count()
    with MemoryPoller(interval=0.1) as mem:
        _, sec = fit(args.impl, train, args.blocks)
    before = {"jvm": mem.before["jvm"], "python_driver": mem.before["python_driver"],
              "python_workers": mem.before["python_workers_total"]}
    record({"benchmark": "als_memory", "dataset": args.dataset, "impl": args.impl, "fit_seconds": round(sec, 2),
            "peak_rss_mb": round(mem.peak_rss / 2**20), "rss_before_fit_mb": round(mem.before_rss / 2**20),
            "peak_pss_mb": round(mem.peak["total"] / 2**20), "pss_before_fit_mb": round(mem.before["total"] / 2**20),
            "peak_pss_mb_by_role": {k: round(v / 2**20) for k, v in mem.at_peak.items()},
            "pss_before_fit_mb_by_role": {k: round(v / 2**20) for k, v in before.items()},
            "driver_memory": args.driver_memory, "blocks": args.blocks})
    spark.stop()


def cmd_scale(args) -> None:
    spark = session(args.driver_memory)
    for millions in args.sizes:
        path = dataset_path(f"synthetic-{millions}m")
        ratings = spark.read.parquet(str(path))
        n = ratings.count()
        from mf_spark import ImplicitALS

        with MemoryPoller(interval=0.1) as mem:
            t0 = time.perf_counter()
            model = ImplicitALS(rank=RANK, maxIter=ITERS, regParam=REG, alpha=ALPHA, numUserBlocks=args.blocks,
                                numItemBlocks=args.blocks, seed=42,
                                broadcastThreshold=args.broadcast_threshold).fit(ratings)
            total = time.perf_counter() - t0
        record({"benchmark": "als_scale", "interactions": n, "users": model.userFactors.count(),
                "items": model.itemFactors.count(), "fit_seconds": round(total, 2),
                "seconds_per_iteration": [round(s, 2) for s in model.iterationSeconds],
                "mean_seconds_per_iteration": round(float(np.mean(model.iterationSeconds)), 2),
                "peak_rss_mb": round(mem.peak_rss / 2**20), "peak_pss_mb": round(mem.peak["total"] / 2**20),
                "driver_memory": args.driver_memory, "blocks": args.blocks,
                "broadcast_threshold": args.broadcast_threshold})
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("compare", "memory", "scale"):
        p = sub.add_parser(name)
        p.add_argument("--blocks", type=int, default=4)
        p.add_argument("--driver-memory", default="8g")
        if name != "scale":
            p.add_argument("--dataset", default="synthetic-2m")
        if name == "compare":
            p.add_argument("--repeats", type=int, default=1)
            p.add_argument("--reverse", action="store_true", help="fit ours first")
        if name == "memory":
            p.add_argument("--impl", choices=("ours", "mllib"), required=True)
        if name == "scale":
            p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
            p.add_argument("--broadcast-threshold", type=int, default=64 * 1024 * 1024,
                           help="ImplicitALS broadcastThreshold in bytes (0: route every half-step by out-blocks)")
    args = parser.parse_args()
    {"compare": cmd_compare, "memory": cmd_memory, "scale": cmd_scale}[args.cmd](args)


if __name__ == "__main__":
    main()
