"""How far from the exact solve does the default CG solver end? Objective per iteration, numpy only.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/cg_vs_cholesky.py

Runs the implicit-ALS iteration of ``mf_spark.als.solve`` in one process, without Spark: each iteration
solves the item factors from the user factors, then the user factors from the item factors, and the full
objective (Hu, Koren and Volinsky 2008, eq. 3, with the kernels' confidence and count regularisation) is
recomputed after each iteration with ``block_loss`` and ``regularization_loss``. Both solvers start from
the same unit-norm Gaussian factors (as ``mf_spark.als.train.random_factors``). Reported, per data set,
confidence scale ``alpha`` and ``cg_steps``: the ratio CG objective / Cholesky objective after
iterations 1, 5, 10 and 15 (1 = CG is where the exact solve is; each CG half-step ends above the exact
minimum for the same fixed side, but the two runs follow different paths, so a ratio below 1 is
possible), and the median wall time of one iteration (both half-steps and their Gramians, not the
objective) of each solver; the JSON also has every iteration's wall and CPU time.

Data:

* ``synthetic``: 3,000 users x 1,500 items, 60,000 events, seeded: users uniform, items drawn from a
  Pareto (shape 1) popularity folded onto the item ids, each event a count of 1..19 plays, repeated
  (user, item) pairs summed; users and items without events are dropped. Linear confidence
  ``c = 1 + alpha * count``.
* ``lastfm-2k``, if ``../shared/data/lastfm-2k/user_artists.dat`` exists (HetRec 2011 play counts, up to
  352,698, read-only): log confidence ``c = 1 + alpha * log(1 + count)``, as the quality runs search it
  (linear confidence on raw play counts is meaningless at these scales).

Rank 32, ``reg_param`` 0.1 (count regularisation, ``lambda_u = 0.1 * n_u``), 15 iterations. One BLAS
thread, as one Spark task per core runs the kernels. Writes ``benchmarks/results/cg_vs_cholesky.json``
(every objective and iteration time) and ``cg_vs_cholesky.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# One BLAS thread: the Spark layer runs one task per core, so a kernel must be fast on one core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the thread settings, which BLAS reads at load time)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mf_spark.als import solve  # noqa: E402
from mf_spark.als.params import SolveParams  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LASTFM = REPO.parent / "shared" / "data" / "lastfm-2k" / "user_artists.dat"
REPORTED_ITERATIONS = (1, 5, 10, 15)


class Interactions:
    """A user x item count matrix held twice in CSR form: by user (users as dst) and by item.

    Parameters
    ----------
    users, items : np.ndarray, shape (nnz,), int
        Dense 0-based ids; a repeated (user, item) pair is summed into one entry.
    counts : np.ndarray, shape (nnz,)
        Positive counts.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, counts: np.ndarray):
        self.n_users, self.n_items = int(users.max()) + 1, int(items.max()) + 1
        self.by_user = _csr(users, items, counts, self.n_users, self.n_items)
        self.by_item = _csr(items, users, counts, self.n_items, self.n_users)
        self.nnz = len(self.by_user[1])
        if (self.by_user[2] <= 0).any():
            raise ValueError("counts must be positive")

    def describe(self) -> str:
        per_item = np.diff(self.by_item[0])
        counts = self.by_user[2]
        return (
            f"{self.n_users} users x {self.n_items} items, {self.nnz} pairs; users per item median "
            f"{int(np.median(per_item))}, max {per_item.max()}; counts median {np.median(counts):g}, "
            f"max {counts.max():g}"
        )


def _csr(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``indptr`` (n_rows + 1,) int64, ``indices`` int32, ``values`` float32; duplicates summed."""
    keys, inverse = np.unique(rows.astype(np.int64) * n_cols + cols, return_inverse=True)
    summed = np.bincount(inverse, weights=values)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // n_cols, minlength=n_rows), out=indptr[1:])
    return indptr, (keys % n_cols).astype(np.int32), summed.astype(np.float32)


def _dense_ids(ids: np.ndarray) -> np.ndarray:
    return np.unique(ids, return_inverse=True)[1]


def synthetic(n_users: int, n_items: int, n_events: int, seed: int) -> Interactions:
    """Long-tailed synthetic play counts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events)
    items = (rng.pareto(1.0, n_events) * 20).astype(np.int64) % n_items
    counts = rng.integers(1, 20, n_events)
    return Interactions(_dense_ids(users), _dense_ids(items), counts)


def lastfm(path: Path) -> Interactions:
    """HetRec 2011 Last.fm user-artist play counts (tab-separated, header, CRLF)."""
    table = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.int64)
    return Interactions(_dense_ids(table[:, 0]), _dense_ids(table[:, 1]), table[:, 2])


def initial_factors(n: int, rank: int, seed: int, side: int) -> np.ndarray:
    """Unit-norm Gaussian rows, float32, as ``mf_spark.als.train.random_factors``."""
    factors = np.random.default_rng([seed, side]).standard_normal((n, rank))
    factors /= np.linalg.norm(factors, axis=1, keepdims=True)
    return factors.astype(np.float32)


def objective(data: Interactions, x: np.ndarray, y: np.ndarray, params: SolveParams) -> float:
    """Full objective: data term over all user-item pairs plus both sides' regularisation."""
    indptr, indices, ratings = data.by_user
    data_term, user_reg = solve.block_loss(
        indptr, indices, ratings, x, y, solve.gramian(y), data.n_items, params
    )
    item_reg = solve.regularization_loss(np.diff(data.by_item[0]), y, data.n_users, params)
    return data_term + user_reg + item_reg


def train(
    data: Interactions, params: SolveParams, rank: int, iterations: int, seed: int
) -> dict[str, list[float]]:
    """Alternate ``iterations`` times (items, then users) from the seeded initial factors.

    Returns
    -------
    dict
        ``objective`` (recomputed after each iteration), ``reported_objective`` (the solver's own value
        from ``solve_block_with_objective`` plus the item regularisation, which for CG rests on its
        recurrence residual), ``seconds`` and ``cpu_seconds`` of each iteration.
    """
    x = initial_factors(data.n_users, rank, seed, 0)
    y = initial_factors(data.n_items, rank, seed, 1)
    item_positive = np.diff(data.by_item[0])
    keys = ("objective", "reported_objective", "seconds", "cpu_seconds")
    out: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(iterations):
        start, cpu_start = time.perf_counter(), time.process_time()
        y = solve.solve_block(*data.by_item, x, solve.gramian(x), data.n_users, params, y)
        x, user_side = solve.solve_block_with_objective(
            *data.by_user, y, solve.gramian(y), data.n_items, params, x
        )
        out["seconds"].append(time.perf_counter() - start)
        out["cpu_seconds"].append(time.process_time() - cpu_start)
        reported = user_side + solve.regularization_loss(item_positive, y, data.n_users, params)
        out["reported_objective"].append(reported)
        out["objective"].append(objective(data, x, y, params))
    return out


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/self/maps") as f:
        blas = sorted({line.split()[-1] for line in f if "blas" in line.lower()})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas_loaded": blas,
        "openblas_num_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "git_commit": commit.stdout.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "lastfm-2k"],
                        help="lastfm-2k is skipped if its file is missing")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 5.0, 40.0])
    parser.add_argument("--cg-steps", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reg-param", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic data and initial factors")
    parser.add_argument("--users", type=int, default=3_000, help="synthetic users")
    parser.add_argument("--items", type=int, default=1_500, help="synthetic items")
    parser.add_argument("--events", type=int, default=60_000, help="synthetic events")
    parser.add_argument("--name", default="cg_vs_cholesky", help="results/<name>.json and .md")
    args = parser.parse_args()
    if args.iterations < max(REPORTED_ITERATIONS):
        parser.error(f"--iterations must be at least {max(REPORTED_ITERATIONS)}")

    started = time.perf_counter()
    load_start = os.getloadavg()
    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} python", *sys.argv]),
        "settings": {
            k: getattr(args, k) for k in ("rank", "reg_param", "iterations", "seed", "alphas", "cg_steps")
        },
        "datasets": {},
    }
    for name in args.datasets:
        if name == "synthetic":
            data, confidence = synthetic(args.users, args.items, args.events, args.seed), "linear"
        elif name == "lastfm-2k":
            if not LASTFM.exists():
                print(f"skipping lastfm-2k: {LASTFM} not found")
                continue
            data, confidence = lastfm(LASTFM), "log"
        else:
            parser.error(f"unknown data set {name}")
        print(f"{name}: {data.describe()}; {confidence} confidence", flush=True)
        runs = []
        for alpha in args.alphas:
            base = SolveParams(alpha=alpha, reg_param=args.reg_param, confidence=confidence)
            exact = train(data, base, args.rank, args.iterations, args.seed)
            runs.append({"alpha": alpha, "solver": "cholesky", "cg_steps": None, **exact})
            for steps in args.cg_steps:
                params = SolveParams(alpha=alpha, reg_param=args.reg_param, confidence=confidence,
                                     solver="cg", cg_steps=steps)
                approx = train(data, params, args.rank, args.iterations, args.seed)
                runs.append({"alpha": alpha, "solver": "cg", "cg_steps": steps, **approx})
                ratios = [approx["objective"][t - 1] / exact["objective"][t - 1] for t in REPORTED_ITERATIONS]
                print(
                    f"  alpha {alpha:g} cg_steps {steps:2d}: CG/Cholesky "
                    + " ".join(f"it{t} {r:.5f}" for t, r in zip(REPORTED_ITERATIONS, ratios))
                    + f"; s/iter CG {statistics.median(approx['seconds']):.3f}, "
                    f"Cholesky {statistics.median(exact['seconds']):.3f}",
                    flush=True,
                )
        out["datasets"][name] = {"description": data.describe(), "confidence": confidence, "runs": runs}
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["machine"] = {
        **machine(), "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict) -> str:
    """The results table: objective ratios at the reported iterations and median time per iteration."""
    its = REPORTED_ITERATIONS
    lines = [
        "### Conjugate gradient vs exact Cholesky solve: objective ratio CG / Cholesky after each iteration",
        "",
        "| data set | confidence | alpha | CG steps | " + " | ".join(f"it {t}" for t in its)
        + " | CG s/iter | Cholesky s/iter |",
        "|---|---|---|---|" + "---|" * len(its) + "---|---|",
    ]
    worst_reported = 0.0
    for name, result in out["datasets"].items():
        runs = result["runs"]
        for exact in (r for r in runs if r["solver"] == "cholesky"):
            for approx in (r for r in runs if r["solver"] == "cg" and r["alpha"] == exact["alpha"]):
                ratios = [approx["objective"][t - 1] / exact["objective"][t - 1] for t in its]
                lines.append(
                    f"| {name} | {result['confidence']} | {exact['alpha']:g} | {approx['cg_steps']} | "
                    + " | ".join(f"{r:.5f}" for r in ratios)
                    + f" | {statistics.median(approx['seconds']):.3f}"
                    + f" | {statistics.median(exact['seconds']):.3f} |"
                )
        for run in runs:
            for reported, recomputed in zip(run["reported_objective"], run["objective"]):
                worst_reported = max(worst_reported, abs(reported - recomputed) / abs(recomputed))
    settings, machine_info = out["settings"], out["machine"]
    lines += [
        "",
        f"Rank {settings['rank']}, reg_param {settings['reg_param']:g} (count regularisation), "
        f"{settings['iterations']} iterations, both solvers from the same seeded factors "
        f"(seed {settings['seed']}); "
        "objective recomputed after each iteration (the solvers' own values agree within "
        f"{worst_reported:.1e} relative). Times: median wall seconds of one iteration (both half-steps), "
        "one BLAS thread, on a shared machine "
        f"(load average {machine_info['load_average_start'][0]:.1f} at start, "
        f"{machine_info['load_average_end'][0]:.1f} at end), so indicative only.",
        "",
    ]
    for name, result in out["datasets"].items():
        lines.append(f"- {name}: {result['description']}; {result['confidence']} confidence.")
    lines += [
        "",
        f"{out['date']}, {machine_info['cpu']}, numpy {machine_info['numpy']}, "
        f"Python {machine_info['python']}, "
        f"commit {machine_info['git_commit']}; {out['wall_seconds']:.0f} s in all.",
        f"Produced by `{out['command']}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
