"""The fixed cost of a Spark job on this machine, and how many jobs each ALS fit runs.

ImplicitALS needs the driver once per half-step (the fixed side's Gramian, and its factors when they
are broadcast), so a fit of n iterations runs at least 2n Spark jobs whatever its kernels cost. This
benchmark measures what such a job costs with no work in it, so the floor under the fit time is a
measured figure, not a guess:

* ``jvm count``: ``count()`` of a cached RDD, all in the JVM (no Python worker), 1/2/4/8 tasks;
* ``python no-op``: a Python ``mapPartitions`` that reads its partition and returns one int, collected
  (a task that leaves its input unread costs far more: PySpark cannot reuse its worker);
* ``python persist 3.2 MB/task``: a Python task that rewrites a 3.2 MB numpy block and persists it,
  the shape of one ALS half-step job (run with the JVM-side ``_jrdd.count()`` as ImplicitALS does);
* ``python collect 3.2 MB/task``: the same job collected to the driver, as for a broadcast side;
* ``broadcast 12.8 MB``: ``sc.broadcast`` of a 100,000 x 32 float32 table, the user factors of the
  synthetic-2m benchmark;
* ``barrier allGather 1.3 MB``: one ``BarrierTaskContext.allGather`` of a 1.3 MB string per task in a
  2-task barrier stage, the exchange a fit held inside one barrier stage would need per half-step;
* ``jobs per fit``: Spark jobs (and stages) run by one fit of ImplicitALS and of MLlib ALS (rank 8,
  10 iterations, 4 blocks, a seeded 50,000-rating synthetic set), counted with the status tracker.

Run from the repository root (other work on the machine paused, as for every timing):

    .venv/bin/python benchmarks/bench_overhead.py

Appends one JSON line to ``benchmarks/results/overhead.jsonl``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_als import record  # noqa: E402  (benchmarks/, the script's folder)

RESULTS = REPO / "benchmarks" / "results" / "overhead.jsonl"
TASKS = (1, 2, 4, 8)
WARMUP, REPEATS = 10, 15


def timed(action, repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Median seconds of ``action()`` after ``warmup`` untimed runs (the JVM compiles hot paths first)."""
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        action()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def job_costs(sc) -> dict:
    costs: dict[str, dict[int, float]] = {
        "jvm count": {}, "python no-op": {}, "python persist 3.2 MB/task": {}, "python collect 3.2 MB/task": {}}
    for n in TASKS:
        cached = sc.parallelize(range(n), n).map(lambda i: (i, np.ones(800_000, np.float32))).cache()
        cached._jrdd.count()
        costs["jvm count"][n] = timed(lambda: cached._jrdd.count())
        costs["python no-op"][n] = timed(lambda: cached.mapPartitions(lambda it: [sum(1 for _ in it)]).collect())

        def doubled(records):
            for key, block in records:
                yield key, block * 2

        def persist_job():
            out = cached.mapPartitions(doubled, preservesPartitioning=True).cache()
            out._jrdd.count()
            out.unpersist()

        def collect_job():
            out = cached.mapPartitions(doubled, preservesPartitioning=True).cache()
            out.collect()
            out.unpersist()

        costs["python persist 3.2 MB/task"][n] = timed(persist_job)
        costs["python collect 3.2 MB/task"][n] = timed(collect_job)
        cached.unpersist()
    return costs


def broadcast_cost(sc) -> float:
    table = np.ones((100_000, 32), np.float32)

    def once():
        sc.broadcast(table).unpersist()

    return timed(once, repeats=10, warmup=3)


def barrier_all_gather_cost(sc) -> float:
    """Median seconds of one allGather of a 1.3 MB message per task, 2 tasks, inside one barrier stage."""

    def exchange(_):
        import base64
        import statistics
        import time

        from pyspark import BarrierTaskContext

        context = BarrierTaskContext.get()
        message = base64.b64encode(bytes(975_000)).decode("ascii")  # 1.3 MB of text
        context.barrier()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            context.allGather(message)
            times.append(time.perf_counter() - t0)
        yield statistics.median(times)

    return round(statistics.median(sc.parallelize(range(2), 2).barrier().mapPartitions(exchange).collect()), 4)


def jobs_per_fit(spark) -> dict:
    from pyspark.ml.recommendation import ALS

    from mf_spark import ImplicitALS

    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), float(r)) for u, i, r in
            zip(rng.integers(0, 5000, 50_000), rng.integers(0, 2000, 50_000), rng.integers(1, 5, 50_000))]
    ratings = spark.createDataFrame(rows, "user int, item int, rating double").dropDuplicates(["user", "item"]).cache()
    ratings.count()
    kw = dict(rank=8, maxIter=10, regParam=0.1, alpha=10.0, numUserBlocks=4, numItemBlocks=4, seed=1)
    sc = spark.sparkContext
    tracker = sc.statusTracker()
    counts = {}
    for name, estimator in (("mllib", ALS(implicitPrefs=True, **kw)), ("ours", ImplicitALS(**kw))):
        group = f"bench-overhead-{name}"
        sc.setJobGroup(group, f"one {name} fit")
        model = estimator.fit(ratings)
        model.userFactors.count()
        model.itemFactors.count()
        jobs = tracker.getJobIdsForGroup(group)
        stages = {s for j in jobs for s in tracker.getJobInfo(j).stageIds} if jobs else set()
        counts[name] = {"jobs": len(jobs), "stages": len(stages)}
    sc.setJobGroup("", "")
    ratings.unpersist()
    return counts


def main() -> None:
    from mf_spark.session import build_session

    spark = build_session("mf-spark-bench-overhead", {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
                          master="local[2]", log_level="ERROR")
    sc = spark.sparkContext
    result = {"benchmark": "spark_job_overhead", "median_seconds": job_costs(sc),
              "broadcast_12_8_mb_seconds": broadcast_cost(sc),
              "barrier_all_gather_1_3_mb_seconds": barrier_all_gather_cost(sc), "jobs_per_fit": jobs_per_fit(spark)}
    spark.stop()
    record(result, RESULTS, "benchmarks/bench_overhead.py")


if __name__ == "__main__":
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    main()
