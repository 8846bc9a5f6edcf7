"""Faults the nightly must survive, on the real job submitted with ./spark-submit.sh in local[2].

Each test copies a baseline output root (2011-12-08 and 2011-12-09 published by a small backfill) and
runs the nightly against the copy as a subprocess: killed mid-write, given no input, failing its
quality gate, finding the root locked, rerun, backfilled, rolled back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import (
    DAY,
    DAY_BEFORE,
    REPO_ROOT,
    assert_same_factors,
    assert_same_top_n,
    base_env,
    copy_root,
    ensure_baseline,
    latest_run_dir,
    manifest,
    nightly_args,
    published_runs,
    read_table,
    run_submit,
    submit,
)
from mf_spark.errors import InputDataError, LockHeldError, QualityGateError
from mf_spark.publish import RunLock, pid_alive

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return ensure_baseline(tmp_path_factory.getbasetemp() / "nightly-baseline")


def latest_bytes(root: Path) -> bytes:
    return (root / "latest.json").read_bytes()


def test_baseline_backfill_warm_starts_each_date_from_the_previous(baseline):
    runs = published_runs(baseline)
    assert set(runs) == {DAY_BEFORE, DAY} and all(len(ids) == 1 for ids in runs.values())
    day = manifest(latest_run_dir(baseline))
    assert day["run"]["run_date"] == DAY and day["status"] == "published"
    assert day["train"]["warm_start_from"] == runs[DAY_BEFORE][0]
    assert day["train"]["iterations"] == 3  # train.warm_start_iterations
    recs = read_table(latest_run_dir(baseline) / "recommendations")
    assert recs.groupby("user_id")["rank"].apply(lambda r: sorted(r) == list(range(1, len(r) + 1))).all()


def wait_for(predicate, timeout: float, what: str, submission) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if submission.process.poll() is not None:
            pytest.fail(f"the nightly ended (exit {submission.process.returncode}) before {what}:\n"
                        f"{submission.output[-4000:]}")
        time.sleep(0.1)
    submission.kill()
    pytest.fail(f"timed out waiting for {what}:\n{submission.output[-4000:]}")


def test_driver_killed_while_writing_then_rerun(baseline, tmp_path):
    """SIGKILL of the driver mid-write: the previous publication stays; the rerun cleans up and matches."""
    root = copy_root(baseline, tmp_path / "root")
    before = latest_bytes(root)
    previous_run = latest_run_dir(root)
    previous_recs = read_table(previous_run / "recommendations")

    crashing = submit(nightly_args(root), tmp_path / "crash.log")
    try:
        new_runs = lambda: [p for p in root.glob(f"runs/dt={DAY}/run_id=*") if p != previous_run]  # noqa: E731
        wait_for(lambda: any((p / "recommendations").exists() for p in new_runs()), 600,
                 "the new run started writing recommendations", crashing)
        driver_pid = json.loads((root / "_LOCK").read_text())["pid"]
        os.kill(driver_pid, signal.SIGKILL)  # the Python driver, which holds the lock
        crashing.wait(120)
    finally:
        crashing.kill()
    assert crashing.process.returncode != 0

    # consumers still see the previous run, complete
    assert latest_bytes(root) == before
    assert read_table(previous_run / "recommendations").equals(previous_recs)
    [partial] = new_runs()
    assert not (partial / "_PUBLISHED").exists() and not (partial / "manifest.json").exists()

    # the dead driver's lock stops the next run until it is broken on purpose (the job's exit code 6
    # for a held lock is checked in test_second_run_on_a_locked_root_exits_naming_the_holder)
    with pytest.raises(LockHeldError, match=f"pid {driver_pid} .*Its process is gone: rerun with --break-stale-lock"):
        RunLock(str(root), dt.date.fromisoformat(DAY)).acquire()

    code, out = run_submit(nightly_args(root, "--break-stale-lock"), tmp_path / "rerun.log")
    assert code == 0, out[-5000:]
    assert not partial.exists(), "the partial directory of the killed run was not cleaned up"
    rerun = latest_run_dir(root)
    assert rerun not in (previous_run, partial)
    assert (previous_run / "_SUPERSEDED").exists()
    assert not (root / "_LOCK").exists()
    # same inputs, same seed, same warm start (2011-12-08): the same tables as the first run of the date
    assert manifest(rerun)["train"]["warm_start_from"] == manifest(previous_run)["train"]["warm_start_from"]
    assert_same_factors(previous_run, rerun)
    assert_same_top_n(previous_run, rerun)
    # the rerun replaced only its own date's publication
    day_before = published_runs(baseline)[DAY_BEFORE]
    assert published_runs(root)[DAY_BEFORE] == day_before
    assert not list(root.glob(f"runs/dt={DAY_BEFORE}/run_id=*/_SUPERSEDED"))


def test_sigterm_to_spark_submit_fails_the_run_says_why_and_frees_the_root(baseline, tmp_path):
    """A scheduler's timeout or ``yarn application -kill`` sends SIGTERM to spark-submit (the JVM, the
    Python driver's parent). The run must end failed, with a manifest naming that cause rather than a
    bare Py4J error, publish nothing, release the lock, and leave the next run nothing to break."""
    root = copy_root(baseline, tmp_path / "root")
    before = latest_bytes(root)
    previous_run = latest_run_dir(root)

    stopped = submit(nightly_args(root), tmp_path / "sigterm.log")
    try:
        new_runs = lambda: [p for p in root.glob(f"runs/dt={DAY}/run_id=*") if p != previous_run]  # noqa: E731
        wait_for(lambda: any((p / "user_factors" / "_SUCCESS").exists() for p in new_runs()), 600,
                 "the new run wrote its factors", stopped)
        driver_pid = json.loads((root / "_LOCK").read_text())["pid"]  # the Python driver, the JVM's child
        os.kill(stopped.process.pid, signal.SIGTERM)  # spark-submit.sh execs spark-submit: the JVM
        code = stopped.wait(120)
        # The JVM exits first; the Python driver then records the failure and releases the lock. (Killing
        # the process group at once, as this test first did, cut that short: no manifest.)
        deadline = time.monotonic() + 60
        while pid_alive(driver_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(driver_pid), "the Python driver outlived its JVM by a minute"
    finally:
        stopped.kill()
    assert code == 143, stopped.output[-4000:]
    assert latest_bytes(root) == before and not (root / "_LOCK").exists()
    [failed] = new_runs()
    assert not (failed / "_PUBLISHED").exists()
    record = manifest(failed)
    assert record["status"] == "failed"
    assert record["error"].startswith("the Spark driver stopped during the run (spark-submit got SIGTERM"), record

    code, out = run_submit(nightly_args(root), tmp_path / "rerun.log")  # no --break-stale-lock needed
    assert code == 0, out[-5000:]
    assert latest_run_dir(root) not in (previous_run, failed)


@pytest.mark.parametrize("case", ["missing_path", "empty_window"])
def test_missing_or_empty_input_fails_clearly_and_publishes_nothing(baseline, tmp_path, case):
    root = copy_root(baseline, tmp_path / "root")
    before = latest_bytes(root)
    if case == "missing_path":
        extra = ["--set", f"input.path={tmp_path / 'no-such-events'}"]
        date, expected = DAY, str(tmp_path / "no-such-events")
    else:
        # 2011-12-03 is a Saturday: the shop logged no invoices, so a one-day window is empty
        extra = ["--set", "ingest.lookback_days=1"]
        date, expected = "2011-12-03", "2011-12-03"
    code, out = run_submit(nightly_args(root, *extra, date=date), tmp_path / "run.log")
    assert code == InputDataError.exit_code, out[-4000:]
    error_lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert error_lines and expected in error_lines[0], out[-4000:]
    assert "Traceback" not in out
    assert latest_bytes(root) == before
    assert published_runs(root) == published_runs(baseline)
    assert not (root / "_LOCK").exists()


def test_quality_gate_failure_publishes_nothing_and_says_why(baseline, tmp_path):
    root = copy_root(baseline, tmp_path / "root")
    before = latest_bytes(root)
    code, out = run_submit(nightly_args(
        root, "--set", "evaluate.enabled=true", "--set", "evaluate.models=['implicit_als']",
        "--set", "evaluate.gate.metric='ndcg@20'",
        "--set", "evaluate.gate.min_value=1.0"), tmp_path / "gate.log")
    assert code == QualityGateError.exit_code, out[-4000:]
    assert "quality gate failed" in out and "ndcg@20" in out
    # an operator reads this log: Spark's warnings about our plans (a window without partitions, a plan
    # too wide to print with the default ks) are fixed at their cause, so none may come back
    assert [line for line in out.splitlines() if " WARN " in line] == []
    assert latest_bytes(root) == before
    assert published_runs(root) == published_runs(baseline)
    [failed] = [p.parent for p in root.glob(f"runs/dt={DAY}/run_id=*/manifest.json")
                if manifest(p.parent)["status"] == "failed"]
    recorded = manifest(failed)
    assert "quality gate failed" in recorded["error"] and "ndcg@20" in recorded["error"]
    assert recorded["gate"]["passed"] is False
    assert recorded["metrics"]  # the measured value is kept for the operator
    assert not (failed / "_PUBLISHED").exists()


def test_second_run_on_a_locked_root_exits_naming_the_holder(baseline, tmp_path):
    root = copy_root(baseline, tmp_path / "root")
    before = latest_bytes(root)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = {"host": os.uname().nodename, "pid": holder.pid, "started_at": "2011-12-09T03:00:00Z",
                "run_date": DAY, "purpose": "nightly", "token": "holder"}
        (root / "_LOCK").write_text(json.dumps(lock))
        # --break-stale-lock never breaks a live owner's lock
        code, out = run_submit(nightly_args(root, "--break-stale-lock"), tmp_path / "run.log")
    finally:
        holder.kill()
        holder.wait()
    assert code == LockHeldError.exit_code, out[-4000:]
    message = next(line for line in out.splitlines() if line.startswith("error: "))
    assert f"pid {holder.pid}" in message and os.uname().nodename in message
    assert "2011-12-09T03:00:00Z" in message and "still running" in message
    assert latest_bytes(root) == before
    assert json.loads((root / "_LOCK").read_text())["token"] == "holder"


def test_backfill_stops_at_the_first_failing_date_and_keeps_retention(tmp_path):
    root = tmp_path / "root"
    # one-day windows: 2011-12-03 (a Saturday) has no events and fails
    code, out = run_submit(nightly_args(root, "--from", "2011-11-30", "--to", "2011-12-04",
                                        "--set", "ingest.lookback_days=1", "--set", "publish.keep_runs=2", date=None),
                           tmp_path / "backfill.log")
    assert code == InputDataError.exit_code, out[-4000:]
    assert "backfill stopped at 2011-12-03" in out
    assert "--from 2011-12-03 --to 2011-12-04" in out
    # 2011-11-30, 12-01, 12-02 were published in order; retention kept the last two
    runs = published_runs(root)
    assert sorted(runs) == ["2011-12-01", "2011-12-02"]
    latest = json.loads((root / "latest.json").read_text())
    assert latest["run_date"] == "2011-12-02"
    first, second = (root / f"runs/dt={d}/run_id={runs[d][0]}" for d in ("2011-12-01", "2011-12-02"))
    assert manifest(second)["train"]["warm_start_from"] == runs["2011-12-01"][0]
    assert manifest(first)["train"]["warm_start_from"] is not None  # from 2011-11-30, since deleted
    assert not list(root.glob("runs/dt=2011-12-04"))  # never started

    # roll back to 2011-12-01 with the one documented command, then forward again by run id
    rollback = [sys.executable, "jobs/rollback.py", "--config", "conf/local.toml", "--set", f"output.root={root}"]
    done = subprocess.run([*rollback, "--date", "2011-12-01"], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((root / "latest.json").read_text())["run_id"] == runs["2011-12-01"][0]
    listing = subprocess.run([*rollback, "--list"], cwd=REPO_ROOT, env=base_env(), capture_output=True,
                             text=True, timeout=120)
    assert f"* 2011-12-01  {runs['2011-12-01'][0]}" in listing.stdout
    done = subprocess.run([*rollback, "--to", runs["2011-12-02"][0]], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((root / "latest.json").read_text())["run_id"] == runs["2011-12-02"][0]
