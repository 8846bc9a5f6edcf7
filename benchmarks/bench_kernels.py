"""Time the ALS block kernels (``mf_spark.als.solve.solve_block``) on one core with a synthetic block.

The block mimics a real one: 1,000,000 ratings of 50,000 dst entities against 20,000 local src entities,
power-law row and column counts (every dst row has at least one rating), count-like ratings of which 5%
are negative. Seeded, so every run times the same block. Prints the best and median wall time of each
solver (``cholesky`` and ``cg`` with 3 steps) for k in 16, 32 and 64, the best CPU time (less sensitive
to other processes), and the machine's load average: wall times are only comparable on an idle machine.

Run from the repository root::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels.py

Targets at k = 32 on one core: cg (3 steps) <= 0.3 s, cholesky <= 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# One BLAS thread: the Spark layer runs one task per core, so a kernel must be fast on one core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the thread settings, which BLAS reads at load time)

from mf_spark.als.params import SolveParams  # noqa: E402
from mf_spark.als.solve import gramian, solve_block  # noqa: E402


def synthetic_block(
    n_dst: int, n_src: int, nnz: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR block with power-law row and column counts and no duplicate (row, col) pairs.

    Returns ``indptr`` (n_dst + 1,) int64, ``indices`` (nnz,) int32, ``ratings`` (nnz,) float32.
    """
    rng = np.random.default_rng(seed)
    # Zipf-like popularity over a random permutation of ids, so heavy rows are spread over the block.
    row_weight = np.empty(n_dst)
    row_weight[rng.permutation(n_dst)] = 1.0 / np.arange(1, n_dst + 1) ** 0.9
    col_weight = np.empty(n_src)
    col_weight[rng.permutation(n_src)] = 1.0 / np.arange(1, n_src + 1) ** 0.8
    col_weight /= col_weight.sum()
    guaranteed = np.arange(n_dst) * n_src + rng.choice(n_src, size=n_dst, p=col_weight)
    extra = nnz - n_dst
    draws = int(extra * 1.3)
    rows = rng.choice(n_dst, size=draws, p=row_weight / row_weight.sum())
    cols = rng.choice(n_src, size=draws, p=col_weight)
    sampled = np.setdiff1d(np.unique(rows * n_src + cols), guaranteed)
    if len(sampled) < extra:
        raise ValueError(f"could only draw {len(sampled)} distinct extra pairs, need {extra}")
    keys = np.sort(np.concatenate([guaranteed, rng.choice(sampled, size=extra, replace=False)]))
    rows, cols = keys // n_src, keys % n_src
    indptr = np.zeros(n_dst + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_dst), out=indptr[1:])
    ratings = rng.geometric(0.3, size=nnz).astype(np.float32)
    ratings[rng.random(nnz) < 0.05] *= -1
    return indptr, cols.astype(np.int32), ratings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dst", type=int, default=50_000, help="dst entities in the block")
    parser.add_argument("--src", type=int, default=20_000, help="local src entities")
    parser.add_argument("--nnz", type=int, default=1_000_000, help="ratings in the block")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--solvers", nargs="+", default=["cg", "cholesky"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    indptr, indices, ratings = synthetic_block(args.dst, args.src, args.nnz, args.seed)
    counts = np.diff(indptr)
    print(
        f"block: {args.dst} dst x {args.src} src, nnz={len(indices)}, row counts median "
        f"{int(np.median(counts))} p99 {int(np.percentile(counts, 99))} max {counts.max()}; "
        f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    )
    rng = np.random.default_rng(args.seed + 1)
    for rank in args.ranks:
        src = (rng.standard_normal((args.src, rank)) / np.sqrt(rank)).astype(np.float32)
        init = (rng.standard_normal((args.dst, rank)) / np.sqrt(rank)).astype(np.float32)
        src_gramian = gramian(src)
        for solver in args.solvers:
            params = SolveParams(alpha=5.0, reg_param=0.05, solver=solver, cg_steps=3)
            seconds, cpu_seconds = [], []
            for _ in range(args.repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                solve_block(indptr, indices, ratings, src, src_gramian, args.src, params, init)
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)
            print(
                f"k={rank:3d} {solver:9s} wall best {min(seconds):.3f} s median "
                f"{statistics.median(seconds):.3f} s, cpu best {min(cpu_seconds):.3f} s "
                f"(load average {os.getloadavg()[0]:.1f})"
            )


if __name__ == "__main__":
    main()
