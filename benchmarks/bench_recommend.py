"""Top-N for all users: mf_spark.recommend.recommend_top_k vs MLlib ALSModel.recommendForAllUsers.

Commands (repo root, project venv, OpenBLAS installed so MLlib uses native BLAS):

    .venv/bin/python benchmarks/bench_recommend.py compare                       # 100k x 20k, rank 32, N=100
    .venv/bin/python benchmarks/bench_recommend.py scale --users 1000000 --items 100000
    .venv/bin/python benchmarks/bench_recommend.py scale --users 1000000 --items 100000 --max-broadcast-mb 0

(``--max-broadcast-mb 0`` forces the cross plan.) ``compare`` writes random factors (and ~20 seen
items per user) as Parquet, saves the same factors in ALSModel's on-disk layout (metadata +
userFactors/itemFactors Parquet) and loads them with
``ALSModel.load``, checks that both rank identically on a sample of users, then times, in one
``local[2]`` application, each side writing its full output to Parquet:

* MLlib ``recommendForAllUsers(N)`` (no seen-item exclusion: it has none);
* ours with the seen items excluded, and ours without exclusion.

``scale`` times ours alone. Both report, per timed run, the CPU seconds of the whole process tree and
the peak memory (PSS, so forked workers' shared pages count once) of the driver JVM (which runs the
executors in local mode), of the largest Python worker and of the whole tree, polled from /proc.
The machine is shared, so CPU seconds are the steadier figure when the load average is high.
Every result is appended as one JSON line to benchmarks/results/recommend.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from process_memory import MemoryPoller  # noqa: E402  (benchmarks/, the script's folder)
RESULTS = REPO / "benchmarks" / "results" / "recommend.jsonl"
DATA_DIR = Path(os.environ.get("MF_SPARK_BENCH_DATA", "/tmp/mf-spark-bench-recommend"))


# --- data ---------------------------------------------------------------------------------------


def write_factors(path: Path, n: int, rank: int, seed: int, files: int) -> None:
    """``id`` int, ``features`` array<float>: N(0, 1/rank) factors in ``files`` Parquet files."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for part, ids in enumerate(np.array_split(np.arange(n, dtype=np.int32), files)):
        values = (rng.standard_normal((ids.shape[0], rank)) / np.sqrt(rank)).astype(np.float32)
        offsets = pa.array(np.arange(0, (ids.shape[0] + 1) * rank, rank, dtype=np.int32))
        features = pa.ListArray.from_arrays(offsets, pa.array(values.ravel()))
        table = pa.table({"id": pa.array(ids), "features": features})
        pq.write_table(table, path / f"part-{part:05d}.parquet")


def write_seen(path: Path, n_users: int, n_items: int, per_user: int, seed: int, files: int) -> None:
    """``user_idx``, ``item_idx``: ``per_user`` distinct random items per user (a training window)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for part, users in enumerate(np.array_split(np.arange(n_users, dtype=np.int32), files)):
        items = rng.integers(0, n_items, size=(users.shape[0], per_user * 2), dtype=np.int32)
        items.sort(axis=1)
        keep = np.ones_like(items, dtype=bool)
        keep[:, 1:] = items[:, 1:] != items[:, :-1]
        rows = np.repeat(users, per_user * 2)[keep.ravel()]
        cols = items.ravel()[keep.ravel()]
        # at most per_user distinct items per user
        first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        rank_in_user = np.arange(rows.shape[0]) - np.repeat(first, np.diff(np.r_[first, rows.shape[0]]))
        sel = rank_in_user < per_user
        table = pa.table({"user_idx": rows[sel], "item_idx": cols[sel]})
        pq.write_table(table, path / f"part-{part:05d}.parquet")


def dataset(n_users: int, n_items: int, rank: int, seen_per_user: int, files: int) -> Path:
    root = DATA_DIR / f"u{n_users}_i{n_items}_r{rank}_s{seen_per_user}_f{files}"
    if not (root / "_done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_factors(root / "user_factors", n_users, rank, seed=1, files=files)
        write_factors(root / "item_factors", n_items, rank, seed=2, files=files)
        write_seen(root / "seen", n_users, n_items, seen_per_user, seed=3, files=files)
        (root / "_done").touch()
    return root


def als_model_layout(root: Path, rank: int) -> Path:
    """The factors in ALSModel's save layout (DefaultParamsWriter metadata + two Parquet dirs)."""
    model = root / "mllib_model"
    if not (model / "metadata").exists():
        (model / "metadata").mkdir(parents=True)
        metadata = {
            "class": "org.apache.spark.ml.recommendation.ALSModel", "timestamp": int(time.time() * 1000),
            "sparkVersion": "4.3.0", "uid": "ALSModel_bench", "rank": rank,
            "paramMap": {},
            "defaultParamMap": {"userCol": "user", "itemCol": "item", "predictionCol": "prediction",
                                "coldStartStrategy": "nan", "blockSize": 4096},
        }
        (model / "metadata" / "part-00000").write_text(json.dumps(metadata) + "\n")
        shutil.copytree(root / "user_factors", model / "userFactors")
        shutil.copytree(root / "item_factors", model / "itemFactors")
    return model


# --- measurement --------------------------------------------------------------------------------


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": round(load[0], 1),
            "native_blas": os.path.exists("/usr/lib/x86_64-linux-gnu/libblas.so.3"),
            "git_commit": commit.stdout.strip()}


def record(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), **result, "machine": machine()}
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))


def session(args):
    from mf_spark.session import build_session

    return build_session(
        "bench-recommend",
        {"spark.driver.memory": args.driver_memory,
         "spark.sql.shuffle.partitions": str(args.shuffle_partitions),
         "spark.ui.enabled": "false", "spark.local.dir": str(DATA_DIR / "spark-local")},
        master=args.master, log_level="ERROR",
    )


# --- commands -----------------------------------------------------------------------------------


def compare(args) -> None:
    from pyspark.ml.recommendation import ALSModel
    from pyspark.sql import functions as F

    from mf_spark.recommend import recommend_top_k

    root = dataset(args.users, args.items, args.rank, args.seen_per_user, args.files)
    spark = session(args)
    users = spark.read.parquet(str(root / "user_factors"))
    items = spark.read.parquet(str(root / "item_factors"))
    seen = spark.read.parquet(str(root / "seen"))
    model = ALSModel.load(str(als_model_layout(root, args.rank)))
    assert model.rank == args.rank

    # Same factors, same scores: MLlib's lists equal ours (without exclusion) on a sample of users.
    sample = users.select("id").where(F.col("id") % (args.users // 50) == 0)
    mllib_lists = {
        r["user"]: [(x["item"], x["rating"]) for x in r["recommendations"]]
        for r in model.recommendForUserSubset(sample.withColumnRenamed("id", "user"), args.k).collect()
    }
    ours_rows = recommend_top_k(users.join(sample, "id", "left_semi"), items, args.k).collect()
    ours_lists: dict[int, list] = {}
    for r in sorted(ours_rows, key=lambda r: (r["src"], r["rank"])):
        ours_lists.setdefault(r["src"], []).append((r["dst"], r["score"]))
    same_items = sum([i for i, _ in mllib_lists[u]] == [i for i, _ in ours_lists[u]] for u in mllib_lists)
    max_diff = max(abs(a[1] - b[1]) for u in mllib_lists for a, b in zip(mllib_lists[u], ours_lists[u]))
    check = {"sampled_users": len(mllib_lists), "identical_lists": same_items, "max_abs_score_diff": max_diff}
    print("agreement:", check)

    out = DATA_DIR / "out"
    runs: dict[str, list[dict]] = {"mllib": [], "ours_exclude_seen": [], "ours_no_exclusion": []}
    broadcast = args.max_broadcast_mb * 2**20
    for _ in range(args.repeats):
        for name in runs:
            # Planning is inside the timed region: recommend_top_k sizes its inputs eagerly.
            shutil.rmtree(out / name, ignore_errors=True)
            with MemoryPoller() as mem:
                start = time.perf_counter()
                if name == "mllib":
                    df = model.recommendForAllUsers(args.k)
                else:
                    df = recommend_top_k(users, items, args.k,
                                         seen=seen if name == "ours_exclude_seen" else None,
                                         src_block_size=args.block, dst_chunk_size=args.chunk,
                                         max_broadcast_bytes=broadcast)
                df.write.parquet(str(out / name))
                seconds = time.perf_counter() - start
            load = round(os.getloadavg()[0], 1)
            runs[name].append({"seconds": round(seconds, 2), **mem.summary(), "load_avg_1m": load})
            print(name, runs[name][-1], flush=True)
    rows_ours = spark.read.parquet(str(out / "ours_exclude_seen")).count()
    rows_mllib = spark.read.parquet(str(out / "mllib")).select(F.explode("recommendations")).count()
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    cpu = {name: min(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
    record({
        "benchmark": "recommend_compare", "users": args.users, "items": args.items, "rank": args.rank,
        "k": args.k,
        "seen_per_user": args.seen_per_user, "master": args.master, "driver_memory": args.driver_memory,
        "block": args.block, "chunk": args.chunk, "factor_files": args.files,
        "seconds_best": best, "cpu_seconds_best": cpu,
        "ours_over_mllib_seconds": round(best["ours_exclude_seen"] / best["mllib"], 3),
        "ours_over_mllib_cpu": round(cpu["ours_exclude_seen"] / cpu["mllib"], 3),
        "rows_ours": rows_ours, "rows_mllib": rows_mllib, "agreement": check, "runs": runs,
    })
    spark.stop()


def scale(args) -> None:
    from mf_spark.recommend import recommend_top_k

    root = dataset(args.users, args.items, args.rank, args.seen_per_user, args.files)
    spark = session(args)
    users = spark.read.parquet(str(root / "user_factors"))
    items = spark.read.parquet(str(root / "item_factors"))
    seen = spark.read.parquet(str(root / "seen"))
    shutil.rmtree(DATA_DIR / "out" / "scale", ignore_errors=True)
    with MemoryPoller() as mem:
        start = time.perf_counter()
        recs = recommend_top_k(users, items, args.k, seen=seen, src_block_size=args.block,
                               dst_chunk_size=args.chunk, max_broadcast_bytes=args.max_broadcast_mb * 2**20)
        recs.write.parquet(str(DATA_DIR / "out" / "scale"))
        seconds = time.perf_counter() - start
    rows = spark.read.parquet(str(DATA_DIR / "out" / "scale")).count()
    plan = "broadcast" if args.items * args.rank * 4 <= args.max_broadcast_mb * 2**20 else "cross"
    record({
        "benchmark": "recommend_scale", "users": args.users, "items": args.items, "rank": args.rank,
        "k": args.k,
        "seen_per_user": args.seen_per_user, "master": args.master, "driver_memory": args.driver_memory,
        "block": args.block, "chunk": args.chunk, "plan": plan, "seconds": round(seconds, 1), "rows": rows,
        **mem.summary(), "load_avg_1m_end": round(os.getloadavg()[0], 1),
    })
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("compare", "scale"))
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seen-per-user", type=int, default=20)
    parser.add_argument("--files", type=int, default=10,
                        help="Parquet files per table (as MLlib's default 10 blocks)")
    parser.add_argument("--block", type=int, default=4096, help="src_block_size")
    parser.add_argument("--chunk", type=int, default=50_000, help="dst_chunk_size")
    parser.add_argument("--max-broadcast-mb", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--shuffle-partitions", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    {"compare": compare, "scale": scale}[args.command](args)


if __name__ == "__main__":
    main()
