"""Start and stop a real Spark standalone cluster on 127.0.0.1 from the pip-installed PySpark.

One master and N workers (one core each), each started with ``sbin/spark-daemon.sh`` in its own
process group, with logs, pid files and work dirs under a temporary directory and free ports. Stopping
kills every process group by pid (SIGTERM, then SIGKILL), so no JVM outlives the test even when it
fails. Also: running ``./spark-submit.sh`` as a subprocess in its own process group, killable the same
way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
IDENT = "mfspark-test"


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """Environment for Spark processes: the venv's python3 and spark-submit first on PATH, loopback only."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["SPARK_LOCAL_HOSTNAME"] = "127.0.0.1"
    env.setdefault("PYSPARK_PYTHON", str(VENV_BIN / "python3"))
    env.pop("SPARK_HOME", None)  # the pip package's own home, found by find-spark-home
    env.pop("MF_SPARK_FAULT", None)
    # A test's driver JVM lives under a minute on tiny data, where the C2 compiler costs more CPU than
    # it saves (a small nightly: 101 s CPU and 63 s wall with it, 57 s CPU and 48 s wall without).
    # The suite's own long-lived session keeps the default. The bytecode run is the same either way.
    env["SPARK_SUBMIT_OPTS"] = f"{env.get('SPARK_SUBMIT_OPTS', '')} -XX:TieredStopAtLevel=1".strip()
    env.update(extra)
    return env


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, grace_seconds: float = 5.0) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after ``grace_seconds``."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_group_alive(pgid):
                return
            time.sleep(0.1)


@dataclass
class Daemon:
    kind: str
    instance: int
    pid: int
    pgid: int
    log_file: Path

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@dataclass
class StandaloneCluster:
    """A running standalone cluster; use :func:`standalone_cluster` to get one."""

    work: Path
    master_port: int
    master_webui_port: int
    env: dict[str, str]
    master: Daemon | None = None
    workers: list[Daemon] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    def _start_daemon(self, cls: str, instance: int, args: Sequence[str]) -> Daemon:
        script = spark_home() / "sbin" / "spark-daemon.sh"
        # start_new_session: the daemon and everything it forks (executors, Python workers) share a
        # process group of their own, so the group can be killed without touching the test runner.
        subprocess.run(["bash", str(script), "start", cls, str(instance), *args], env=self.env, check=True,
                       start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        pid_file = Path(self.env["SPARK_PID_DIR"]) / f"spark-{IDENT}-{cls}-{instance}.pid"
        pid = int(pid_file.read_text().strip())
        logs = sorted(Path(self.env["SPARK_LOG_DIR"]).glob(f"spark-{IDENT}-{cls}-{instance}-*.out"))
        return Daemon(cls.rsplit(".", 1)[1].lower(), instance, pid, os.getpgid(pid), logs[-1])

    def start(self, num_workers: int, worker_memory: str = "1g", timeout: float = 90.0) -> None:
        self.master = self._start_daemon(MASTER_CLASS, 1, ["--host", "127.0.0.1", "--port", str(self.master_port),
                                                           "--webui-port", str(self.master_webui_port)])
        self.wait_for_log(self.master, "I have been elected leader", 1, timeout)
        for instance in range(1, num_workers + 1):
            self.add_worker(instance, worker_memory)
        self.wait_for_log(self.master, "Registering worker", num_workers, timeout)

    def add_worker(self, instance: int, memory: str = "1g") -> Daemon:
        worker = self._start_daemon(WORKER_CLASS, instance, [
            "--host", "127.0.0.1", "--port", str(free_port()), "--cores", "1", "--memory", memory,
            "--webui-port", str(free_port()), "--work-dir", str(self.work / f"worker-{instance}"), self.url,
        ])
        self.workers.append(worker)
        return worker

    def wait_for_log(self, daemon: Daemon, text: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if daemon.log_text().count(text) >= count:
                return
            if not pid_alive(daemon.pid):
                raise RuntimeError(f"{daemon.kind} {daemon.instance} died:\n{daemon.log_text()[-3000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"{daemon.kind} log never showed {text!r} x{count}:\n{daemon.log_text()[-3000:]}")

    def kill_worker(self, worker: Daemon) -> None:
        """Lose a node: SIGKILL the worker, its executors and their Python workers at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pgid, signal.SIGKILL)

    def stop(self) -> None:
        for daemon in [*self.workers, *([self.master] if self.master else [])]:
            kill_group(daemon.pgid)
        self.workers.clear()
        self.master = None

    def logs(self) -> str:
        parts = []
        for daemon in [*([self.master] if self.master else []), *self.workers]:
            parts.append(f"==== {daemon.kind} {daemon.instance} ({daemon.log_file}) ====\n{daemon.log_text()[-4000:]}")
        return "\n".join(parts)


@contextlib.contextmanager
def standalone_cluster(work: Path, num_workers: int = 2, worker_memory: str = "1g") -> Iterator[StandaloneCluster]:
    """A master and ``num_workers`` one-core workers on 127.0.0.1, stopped by pid on exit."""
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(
        SPARK_LOG_DIR=str(work / "logs"), SPARK_PID_DIR=str(work / "pids"), SPARK_WORKER_DIR=str(work / "work"),
        SPARK_IDENT_STRING=IDENT, SPARK_CONF_DIR=str(work / "daemon-conf"), SPARK_DAEMON_MEMORY="512m",
    )
    env.pop("SPARK_NO_DAEMONIZE", None)
    (work / "daemon-conf").mkdir(exist_ok=True)  # no spark-defaults.conf: the daemons run Spark's defaults
    cluster = StandaloneCluster(work, free_port(), free_port(), env)
    try:
        cluster.start(num_workers, worker_memory)
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Submission:
    """A ``./spark-submit.sh`` subprocess in its own process group."""

    process: subprocess.Popen
    log_file: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)
        kill_group(self.process.pid, grace_seconds=0)

    @property
    def output(self) -> str:
        return self.log_file.read_text(errors="replace")


def submit(args: Sequence[str], log_file: Path, env: dict[str, str] | None = None) -> Submission:
    """Start ``./spark-submit.sh ARGS`` from the repository root; stdout and stderr go to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as out:
        process = subprocess.Popen(["./spark-submit.sh", *args], cwd=REPO_ROOT, env=env or base_env(),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Submission(process, log_file)


def run_submit(args: Sequence[str], log_file: Path, env: dict[str, str] | None = None,
               timeout: float = 600) -> tuple[int, str]:
    """Run ``./spark-submit.sh ARGS`` to completion; returns (exit code, combined output)."""
    submission = submit(args, log_file, env)
    try:
        code = submission.wait(timeout)
    finally:
        kill_group(submission.process.pid, grace_seconds=0)  # stray Python workers, if any
    return code, submission.output


# --------------------------------------------------------------------------------------------------
# the nightly on a small window, and comparing its outputs

DAY_BEFORE, DAY = "2011-12-08", "2011-12-09"

# A week of the embedded sample and a small model, so that one nightly takes seconds of Spark work.
SMALL_NIGHTLY = [
    "--set", "ingest.lookback_days=7",
    "--set", "train.rank=8",
    "--set", "train.max_iter=4",
    "--set", "train.warm_start_iterations=3",
    "--set", "train.num_user_blocks=2",
    "--set", "train.num_item_blocks=2",
    "--set", "recommend.top_n=10",
    "--set", "recommend.similar_n=5",
    "--set", "evaluate.enabled=false",
    "--set", "spark.sql.shuffle.partitions=2",
    "--set", "spark.default.parallelism=2",
    "--set", "spark.ui.enabled=false",
]


def nightly_args(root: Path, *extra: str, date: str | None = DAY, master: str = "local[2]",
                 spark_options: Sequence[str] = ()) -> list[str]:
    """``./spark-submit.sh`` arguments of a small nightly writing to ``root``; ``extra`` are job arguments,
    ``spark_options`` go to spark-submit."""
    args = ["--master", master, *spark_options, "jobs/nightly.py", "--config", "conf/local.toml",
            "--set", f"output.root={root}", *SMALL_NIGHTLY]
    if not master.startswith("local"):
        # one host, so a local directory is shared by every executor, as HDFS or NFS would be on a cluster
        args += ["--set", f"spark.checkpoint.dir={root.parent / (root.name + '-checkpoints')}"]
    if date:
        args += ["--date", date]
    return [*args, *extra]


def ensure_baseline(base: Path) -> Path:
    """An output root holding DAY_BEFORE and DAY published by a local[2] backfill (built once per session).

    Tests copy it (:func:`copy_root`) and rerun DAY on it: a rerun warm-starts from DAY_BEFORE as the
    baseline's DAY did, so its tables must equal the baseline's.
    """
    root = base / "root"
    if not (root / "latest.json").exists():
        code, out = run_submit(nightly_args(root, "--from", DAY_BEFORE, "--to", DAY, date=None),
                               base / "baseline.log")
        assert code == 0, out[-5000:]
    return root


def copy_root(source: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(source, dest, symlinks=True)
    return dest


def latest_run_dir(root: Path) -> Path:
    import json

    return root / json.loads((root / "latest.json").read_text())["path"]


def manifest(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "manifest.json").read_text())


def published_runs(root: Path) -> dict[str, list[str]]:
    """run_date -> run ids with a _PUBLISHED marker, oldest first."""
    runs: dict[str, list[str]] = {}
    for marker in sorted(root.glob("runs/dt=*/run_id=*/_PUBLISHED")):
        runs.setdefault(marker.parent.parent.name[3:], []).append(marker.parent.name[len("run_id="):])
    return runs


def read_table(path: Path):
    """A Parquet table written by Spark, as pandas, read with pyarrow (no Spark needed)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def assert_same_top_n(run_a: Path, run_b: Path, score_rtol: float = 1e-5) -> None:
    """Same (user, rank, item) rows in both runs' recommendations, scores equal up to float rounding."""
    import numpy as np
    import pandas as pd

    a = read_table(run_a / "recommendations").sort_values(["user_id", "rank"]).reset_index(drop=True)
    b = read_table(run_b / "recommendations").sort_values(["user_id", "rank"]).reset_index(drop=True)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a[["user_id", "rank", "item_id"]], b[["user_id", "rank", "item_id"]])
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=score_rtol, atol=1e-6)


def assert_same_factors(run_a: Path, run_b: Path, atol: float = 1e-5) -> None:
    import numpy as np

    for table in ("user_factors", "item_factors"):
        a = read_table(run_a / table).sort_values("id").reset_index(drop=True)
        b = read_table(run_b / table).sort_values("id").reset_index(drop=True)
        assert a["id"].tolist() == b["id"].tolist(), table
        np.testing.assert_allclose(np.stack(a["features"]), np.stack(b["features"]), atol=atol, err_msg=table)
