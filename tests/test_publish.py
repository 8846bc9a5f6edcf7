"""Publication layer: lock, run directories, atomic publish, crash safety, retention, rollback.

No Spark here: the layer works on plain files. Crashes are real: a subprocess SIGKILLs itself at a
chosen point through the test-only ``MF_SPARK_FAULT`` hook.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mf_spark import publish
from mf_spark.errors import LockHeldError, PublishError
from mf_spark.publish import (
    RunDir,
    RunLock,
    apply_retention,
    begin_run,
    list_runs,
    manifest_base,
    previous_published,
    publish_run,
    read_latest,
    rollback,
    run_status,
    write_failed_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
D1, D2, D3, D4 = (dt.date(2011, 12, d) for d in (6, 7, 8, 9))


def fake_tables(run: RunDir, marker: str = "x") -> None:
    """Stand-ins for the Spark tables a run writes."""
    for name in ("user_factors", "item_factors", "recommendations"):
        Path(run.sub(name)).mkdir()
        Path(run.sub(name), "part-0.parquet").write_text(marker)


def published(root: Path, run_date: dt.date, marker: str = "x", keep_runs: int | None = None) -> RunDir:
    run = begin_run(str(root), run_date)
    fake_tables(run, marker)
    publish_run(run, {"metrics": {"ndcg@20": 0.1}, "marker": marker}, keep_runs=keep_runs)
    return run


def test_run_ids_sort_by_start_time_and_are_unique():
    early = publish.new_run_id(dt.datetime(2025, 1, 1, 23, 59, 59, 999999, tzinfo=dt.timezone.utc))
    late = publish.new_run_id(dt.datetime(2025, 1, 2, 0, 0, 0, 1, tzinfo=dt.timezone.utc))
    assert early < late
    assert re.fullmatch(r"20250101T235959999999Z-[0-9a-f]{6}", early)
    assert len({publish.new_run_id() for _ in range(200)}) == 200


def test_begin_run_makes_the_run_directory_and_names_tables(tmp_path):
    run = begin_run(str(tmp_path), D1, run_id="r1")
    assert Path(run.path) == tmp_path / "runs" / "dt=2011-12-06" / "run_id=r1"
    assert Path(run.path).is_dir()
    assert run.sub("recommendations") == str(Path(run.path) / "recommendations")
    with pytest.raises(ValueError):
        run.sub("../elsewhere")
    with pytest.raises(ValueError):
        begin_run(str(tmp_path), D1, run_id="bad/id")


def test_publish_writes_manifest_marker_and_latest(tmp_path):
    run = published(tmp_path, D1)
    manifest = json.loads(Path(run.manifest_path).read_text())
    assert manifest["status"] == "published"
    assert manifest["run"] == {"run_date": "2011-12-06", "run_id": run.run_id, "path": run.relative_path}
    assert (Path(run.path) / "_PUBLISHED").exists()
    latest = read_latest(str(tmp_path))
    assert latest["run_id"] == run.run_id
    assert latest["run_date"] == "2011-12-06"
    assert latest["path"] == run.relative_path
    assert (tmp_path / latest["manifest"]).exists()
    assert latest["published_at"] == manifest["published_at"]
    previous = previous_published(str(tmp_path))
    assert previous["run_dir"] == run.path
    assert previous["run_id"] == run.run_id and previous["run_date"] == "2011-12-06"
    assert previous["marker"] == "x"
    # no temporary files are left next to the published ones
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_a_full_disk_at_latest_json_leaves_no_manifest_saying_published(tmp_path, monkeypatch):
    """latest.json failed (ENOSPC) after manifest.json said published: the marker was removed but the
    manifest kept saying published, which a scheduler reads as a success. With no room for a failed
    manifest either, it is renamed aside (no space needed); the tables can be removed first."""
    import errno

    run = begin_run(str(tmp_path), D1)
    Path(run.sub("user_factors")).mkdir()
    real_write = publish.write_json_atomic

    def full_at_latest(path, payload):
        if Path(path).name == "latest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(publish, "write_json_atomic", full_at_latest)
    with pytest.raises(OSError):
        publish_run(run, manifest_base(run))
    assert run_status(run) == "partial" and json.loads(Path(run.manifest_path).read_text())["status"] == "published"
    publish.retract_manifest(run)
    assert not Path(run.manifest_path).exists()
    assert json.loads((Path(run.path) / "manifest.unpublished.json").read_text())["status"] == "published"
    publish.remove_tables(run)
    assert sorted(p.name for p in Path(run.path).iterdir()) == ["manifest.unpublished.json"]
    # a published run is never touched
    monkeypatch.undo()
    done = published(tmp_path, D1)
    publish.retract_manifest(done)
    assert Path(done.manifest_path).exists()
    with pytest.raises(ValueError, match="is published"):
        publish.remove_tables(done)


def test_low_space_warning_compares_free_space_with_the_previous_run(tmp_path, monkeypatch):
    run = published(tmp_path, D1)
    (Path(run.path) / "table").mkdir()
    (Path(run.path) / "table" / "part-0").write_bytes(b"x" * 3 * 1024 * 1024)
    monkeypatch.setattr(publish, "disk_usage_of", lambda root: 4 * 1024 * 1024)  # below 1.5 x 3 MiB
    warning = publish.low_space_warning(str(tmp_path), run.path)
    assert warning is not None and f"output.root {tmp_path} has 4.0 MiB free" in warning
    assert f"previous run run_id={run.run_id} takes 3.0 MiB" in warning
    monkeypatch.setattr(publish, "disk_usage_of", lambda root: 5 * 1024 * 1024)
    assert publish.low_space_warning(str(tmp_path), run.path) is None


def test_nothing_published_means_no_latest(tmp_path):
    assert read_latest(str(tmp_path)) is None
    assert previous_published(str(tmp_path)) is None
    assert previous_published(str(tmp_path), before=D1) is None


def test_rerun_replaces_only_that_dates_publication(tmp_path):
    day1 = published(tmp_path, D1, "day1")
    first = published(tmp_path, D2, "first")
    second = published(tmp_path, D2, "second")
    assert read_latest(str(tmp_path))["run_id"] == second.run_id
    assert run_status(first) == "superseded"
    assert json.loads((Path(first.path) / "_SUPERSEDED").read_text())["superseded_by"] == second.run_id
    assert run_status(day1) == "published"
    assert run_status(second) == "published"
    # the superseded run is intact until retention removes it (a reader may still be on it)
    assert Path(first.sub("recommendations"), "part-0.parquet").read_text() == "first"


def test_rerun_warm_starts_from_the_previous_date_not_from_itself(tmp_path):
    day1 = published(tmp_path, D1, "day1")
    published(tmp_path, D2, "day2")
    assert previous_published(str(tmp_path))["marker"] == "day2"
    # rerunning D2 must start from the same model the first D2 run started from
    assert previous_published(str(tmp_path), before=D2)["run_dir"] == day1.path
    assert previous_published(str(tmp_path), before=D3)["marker"] == "day2"
    assert previous_published(str(tmp_path), before=D1) is None


def test_a_rerun_after_a_rollback_keeps_the_first_runs_baseline(tmp_path):
    """D2 was bad and rolled back to D1; D3 ran from D1. A rerun of D3 took the newest published run
    before D3, the rolled-back D2, as its warm start and gate baseline."""
    published(tmp_path, D1, "good")
    published(tmp_path, D2, "bad")
    rollback(str(tmp_path), D1.isoformat())
    baseline = previous_published(str(tmp_path), before=D3)
    assert baseline["marker"] == "good"
    first = begin_run(str(tmp_path), D3)
    fake_tables(first)
    publish_run(first, {"marker": "d3", publish.BASELINE_KEY: baseline["run_id"]})
    assert previous_published(str(tmp_path), before=D3)["marker"] == "good"
    # but an earlier date published again since (the bad date rerun, a backfill re-running the range)
    # is newer work: it is the baseline, as the newest published run before D3
    published(tmp_path, D2, "fixed")
    assert previous_published(str(tmp_path), before=D3)["marker"] == "fixed"
    # a first run that had no baseline (nothing published then) gives its reruns none either
    nothing = tmp_path / "fresh"
    day = begin_run(str(nothing), D1)
    fake_tables(day)
    publish_run(day, {publish.BASELINE_KEY: None})
    assert previous_published(str(nothing), before=D1) is None


def test_a_rerun_whose_baseline_retention_removed_says_what_it_starts_from(tmp_path, caplog):
    """The warning said "using the newest published run before D" when there was none (a cold start)."""
    base = published(tmp_path, D1)
    first = begin_run(str(tmp_path), D2)
    fake_tables(first)
    publish_run(first, {publish.BASELINE_KEY: base.run_id})
    shutil.rmtree(base.path)  # as retention does once D1 is older than the kept dates
    with caplog.at_level("WARNING", logger="mf_spark.publish"):
        assert previous_published(str(tmp_path), before=D2) is None
    assert (f"the baseline {base.run_id} of the published run {first.relative_path} is gone (retention); no "
            "published run before 2011-12-07 is left: a cold start, so this rerun's tables will differ") in caplog.text


def test_a_rerun_of_a_date_run_before_upgrading_keeps_its_warm_start_as_baseline(tmp_path, caplog):
    """Manifests written before baseline_run was recorded name the baseline only as train.warm_start_from:
    a rerun of such a date after a rollback took the rolled-back run, and once retention had removed the
    baseline it went cold without the warning."""
    good = published(tmp_path, D1, "good")
    published(tmp_path, D2, "bad")
    rollback(str(tmp_path), D1.isoformat())
    first = begin_run(str(tmp_path), D3)
    fake_tables(first)
    publish_run(first, {"marker": "d3", "train": {"warm_start_from": good.run_id}})  # the old shape
    assert previous_published(str(tmp_path), before=D3)["marker"] == "good"
    shutil.rmtree(good.path)
    with caplog.at_level("WARNING", logger="mf_spark.publish"):
        assert previous_published(str(tmp_path), before=D3)["marker"] == "bad"
    assert f"the baseline {good.run_id} of the published run {first.relative_path} is gone (retention)" in caplog.text


def test_publishing_an_older_date_does_not_move_latest_back(tmp_path):
    later = published(tmp_path, D3)
    older = published(tmp_path, D1)
    assert run_status(older) == "published"
    assert read_latest(str(tmp_path))["run_id"] == later.run_id


def test_failed_run_is_recorded_not_published(tmp_path):
    good = published(tmp_path, D1)
    run = begin_run(str(tmp_path), D2)
    write_failed_manifest(run, {"metrics": {"ndcg@20": 0.0}, "error": "quality gate: ndcg@20 = 0 < 0.5"})
    manifest = json.loads(Path(run.manifest_path).read_text())
    assert manifest["status"] == "failed"
    assert "ndcg@20" in manifest["error"]
    assert not (Path(run.path) / "_PUBLISHED").exists()
    assert run_status(run) == "failed"
    assert read_latest(str(tmp_path))["run_id"] == good.run_id
    # a failed run is kept for inspection by the next run's cleanup
    begin_run(str(tmp_path), D2)
    assert Path(run.path).is_dir()


def test_begin_run_cleans_partial_runs_only(tmp_path):
    good = published(tmp_path, D1)
    crashed = RunDir(str(tmp_path), D2, "20111207T000000000000Z-dead00")
    Path(crashed.sub("recommendations")).mkdir(parents=True)
    failed = begin_run(str(tmp_path), D2)
    write_failed_manifest(failed, {"error": "boom"})
    trash = tmp_path / "runs" / "dt=2011-12-06" / ".deleting-run_id=old-abc123"
    trash.mkdir()
    fresh = begin_run(str(tmp_path), D2)
    assert not Path(crashed.path).exists()
    assert not trash.exists()
    assert Path(good.path).is_dir() and Path(failed.path).is_dir() and Path(fresh.path).is_dir()


def test_cleanup_spares_the_run_of_a_live_lock_holder(tmp_path):
    live_run = RunDir(str(tmp_path), D2, "20111207T000000000000Z-live00")
    Path(live_run.path).mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started_at": "now", "run_date": "2011-12-07",
              "token": "t", "run_id": live_run.run_id}
    (tmp_path / "_LOCK").write_text(json.dumps(holder))
    assert publish.clean_partial_runs(str(tmp_path)) == []
    assert Path(live_run.path).is_dir()
    # without a run id in the lock the live holder's directory cannot be told apart: clean nothing
    del holder["run_id"]
    (tmp_path / "_LOCK").write_text(json.dumps(holder))
    assert publish.clean_partial_runs(str(tmp_path)) == []


def test_lock_blocks_a_second_run_and_names_the_holder(tmp_path):
    with RunLock(str(tmp_path), D1) as lock:
        info = json.loads((tmp_path / "_LOCK").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["run_date"] == "2011-12-06"
        with pytest.raises(LockHeldError) as err:
            RunLock(str(tmp_path), D2).acquire()
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert info["started_at"] in message and "2011-12-06" in message
        assert "still running" in message
        # break_stale never breaks a live owner's lock
        with pytest.raises(LockHeldError):
            RunLock(str(tmp_path), D2, break_stale=True).acquire()
        run = begin_run(str(tmp_path), D1)
        assert json.loads((tmp_path / "_LOCK").read_text())["run_id"] == run.run_id
        # a backfill holds one lock over its dates: the record names the run it is writing, date included
        later = begin_run(str(tmp_path), D2)
        assert {k: json.loads((tmp_path / "_LOCK").read_text())[k] for k in ("run_date", "run_id")} == {
            "run_date": D2.isoformat(), "run_id": later.run_id}
        assert lock.path.exists()
    assert not (tmp_path / "_LOCK").exists()


def test_the_lock_file_never_exists_half_written(tmp_path, monkeypatch):
    """Created empty and then written, the lock was read in between by 13% of the losers of a race
    between two nightlies, who were told it was "cut short by a crash"."""
    linked = []
    real_link = os.link

    def link(source, target):
        linked.append(json.loads(Path(source).read_text())["pid"])  # complete before it gets the name
        real_link(source, target)

    monkeypatch.setattr(publish.os, "link", link)
    with RunLock(str(tmp_path), D1):
        with pytest.raises(LockHeldError, match="still running"):
            RunLock(str(tmp_path), D2).acquire()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["_LOCK"]  # the loser's temporary is gone
    assert linked == [os.getpid(), os.getpid()]


def test_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(str(tmp_path), D1):
            raise RuntimeError("stage failed")
    assert not (tmp_path / "_LOCK").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(root: Path, **fields) -> None:
    info = {"host": socket.gethostname(), "pid": dead_pid(), "started_at": "2011-12-06T03:00:00Z",
            "run_date": "2011-12-06", "token": "old"}
    info.update(fields)
    root.mkdir(parents=True, exist_ok=True)
    (root / "_LOCK").write_text(json.dumps(info))


def test_stale_lock_needs_break_stale(tmp_path):
    write_lock(tmp_path)
    with pytest.raises(LockHeldError, match="--break-stale-lock"):
        RunLock(str(tmp_path), D2).acquire()
    with RunLock(str(tmp_path), D2, break_stale=True):
        assert json.loads((tmp_path / "_LOCK").read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob("_LOCK*"))


def test_reused_pid_counts_as_gone(tmp_path):
    # our own pid is alive, but with another start time it is a different process
    write_lock(tmp_path, pid=os.getpid(), pid_start_ticks=1)
    with RunLock(str(tmp_path), D2, break_stale=True):
        pass


def test_lock_from_another_host_is_never_broken_automatically(tmp_path):
    write_lock(tmp_path, host="other-host.example", pid=12345)
    with pytest.raises(LockHeldError) as err:
        RunLock(str(tmp_path), D2, break_stale=True).acquire()
    assert "other-host.example" in str(err.value) and "by hand" in str(err.value)
    assert (tmp_path / "_LOCK").exists()


def test_retention_keeps_the_newest_runs_and_the_latest(tmp_path):
    runs = [published(tmp_path, day) for day in (D1, D2, D3)]
    failed_old = RunDir(str(tmp_path), D1, "00000000T000000000000Z-failed")
    Path(failed_old.path).mkdir(parents=True)
    write_failed_manifest(failed_old, {"error": "boom"})
    rollback(str(tmp_path), runs[0].run_id)  # consumers now read the oldest run
    fourth = published(tmp_path, D4, keep_runs=2)
    # publishing D4 moved latest to D4; retention kept D3 and D4 and removed D2 and the old failure, and
    # kept D1 until the next publication: consumers that read latest.json a moment ago are reading it
    # (it was deleted within milliseconds of the swap)
    assert read_latest(str(tmp_path))["run_id"] == fourth.run_id
    assert [r["run_date"] for r in list_runs(str(tmp_path))] == ["2011-12-06", "2011-12-08", "2011-12-09"]
    assert apply_retention(str(tmp_path), 2) == [runs[0].relative_path]
    assert [r["run_date"] for r in list_runs(str(tmp_path))] == ["2011-12-08", "2011-12-09"]
    # retention never deletes the run latest.json names, however old
    rollback(str(tmp_path), "2011-12-08")
    fifth = published(tmp_path, D1)  # an older date: latest stays on D3
    assert apply_retention(str(tmp_path), 1) == [fifth.relative_path]
    remaining = {r["run_date"]: r for r in list_runs(str(tmp_path))}
    assert set(remaining) == {"2011-12-08", "2011-12-09"}
    assert remaining["2011-12-08"]["is_latest"]
    with pytest.raises(ValueError):
        apply_retention(str(tmp_path), 0)


def test_a_backfilled_run_survives_its_own_retention(tmp_path):
    """A backfill of older dates with keep_runs smaller than the newer runs: each date's run must stay
    until a later publish, or the next date finds nothing to warm-start from."""
    published(tmp_path, D3)
    published(tmp_path, D4)
    first = published(tmp_path, D1, keep_runs=1)
    assert Path(first.path).is_dir()
    assert previous_published(str(tmp_path), before=D2)["run_id"] == first.run_id
    second = published(tmp_path, D2, keep_runs=1)
    # the newest date and latest.json's run stay; the earlier backfill run has done its job
    assert {r["run_id"] for r in list_runs(str(tmp_path))} == {second.run_id, read_latest(str(tmp_path))["run_id"]}
    assert not Path(first.path).exists()


def test_rollback_by_run_id_and_by_date(tmp_path, caplog):
    day1 = published(tmp_path, D1)
    day2_first = published(tmp_path, D2)
    day2_second = published(tmp_path, D2)
    with caplog.at_level("WARNING", logger="mf_spark.publish"):
        entry = rollback(str(tmp_path), day1.run_id)
        rollback(str(tmp_path), day2_second.run_id)
        rollback(str(tmp_path), day2_second.run_id)
    # going back to the newer run was also logged as "rolled back"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["rolled back", "moved forward", "unchanged"]
    entry = rollback(str(tmp_path), day1.run_id)
    assert read_latest(str(tmp_path)) == entry
    assert entry["run_id"] == day1.run_id and entry["rolled_back_from"] == day2_second.run_id
    assert previous_published(str(tmp_path))["run_dir"] == day1.path
    assert rollback(str(tmp_path), "2011-12-07")["run_id"] == day2_second.run_id
    # a superseded run is complete, so it is a valid target by id
    assert rollback(str(tmp_path), day2_first.run_id)["run_id"] == day2_first.run_id


def test_rollback_refuses_unknown_failed_and_partial_runs(tmp_path):
    published(tmp_path, D1)
    failed = begin_run(str(tmp_path), D2)
    write_failed_manifest(failed, {"error": "boom"})
    partial = RunDir(str(tmp_path), D3, "20111208T000000000000Z-part00")
    Path(partial.path).mkdir(parents=True)
    for target in ("2011-12-31", "nope", failed.run_id, partial.run_id, "2011-12-07"):
        with pytest.raises(PublishError, match="no published run matches"):
            rollback(str(tmp_path), target)


def test_retention_counts_run_dates_not_reruns(tmp_path):
    """Reruns of one date must not push the previous dates (rollback targets, a rerun's warm start and
    gate baseline) out: keep_runs=3 used to keep only the three runs of D3 after two reruns."""
    first, second = published(tmp_path, D1, keep_runs=3), published(tmp_path, D2, keep_runs=3)
    reruns = [published(tmp_path, D3, keep_runs=3) for _ in range(3)]
    kept = {r["run_id"]: r["status"] for r in list_runs(str(tmp_path))}
    assert set(kept) == {first.run_id, second.run_id, *(r.run_id for r in reruns)}
    assert [kept[r.run_id] for r in reruns] == ["superseded", "superseded", "published"]
    assert previous_published(str(tmp_path), before=D3)["run_id"] == second.run_id
    published(tmp_path, D4, keep_runs=3)  # a fourth date: D1 goes, with nothing else
    assert sorted({r["run_date"] for r in list_runs(str(tmp_path))}) == ["2011-12-07", "2011-12-08", "2011-12-09"]
    assert len(list_runs(str(tmp_path))) == 5


def test_a_failure_writing_latest_json_leaves_the_run_unpublished(tmp_path, monkeypatch):
    earlier = published(tmp_path, D1)
    run = begin_run(str(tmp_path), D2)
    real_write = publish.write_json_atomic

    def full_disk(path, payload):
        if Path(path).name == publish.LATEST_NAME:
            raise OSError(28, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(publish, "write_json_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        publish_run(run, {})
    # neither listed as published nor a rollback target: the job reports a failure and marks it failed
    assert not (Path(run.path) / publish.PUBLISHED_MARKER).exists()
    assert run_status(run) != "published"
    assert read_latest(str(tmp_path))["run_id"] == earlier.run_id
    with pytest.raises(PublishError, match="no published run matches"):
        rollback(str(tmp_path), run.run_id)


def test_a_signal_after_latest_json_was_replaced_keeps_the_run_published(tmp_path, monkeypatch):
    """SIGTERM (SystemExit) in the directory fsync after the replace: the marker was removed while
    latest.json named the run, and the next begin_run deleted the run consumers were reading."""
    published(tmp_path, D1)
    run = begin_run(str(tmp_path), D2)
    fake_tables(run)
    real_fsync_dir = publish._fsync_dir

    def terminated_at_root(path):
        if Path(path) == tmp_path:
            raise SystemExit(143)
        real_fsync_dir(path)

    monkeypatch.setattr(publish, "_fsync_dir", terminated_at_root)
    with pytest.raises(SystemExit):
        publish_run(run, {})
    monkeypatch.undo()
    assert read_latest(str(tmp_path))["run_id"] == run.run_id
    assert run_status(run) == "published"
    begin_run(str(tmp_path), D3)
    assert Path(run.path).is_dir()


def test_a_failure_after_latest_json_keeps_the_publication(tmp_path, monkeypatch, caplog):
    published(tmp_path, D1)
    run = begin_run(str(tmp_path), D2)
    fake_tables(run)

    def broken_retention(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(publish, "apply_retention", broken_retention)
    publish_run(run, {}, keep_runs=1)  # does not raise: consumers already read this run
    assert run_status(run) == "published" and read_latest(str(tmp_path))["run_id"] == run.run_id
    assert json.loads(Path(run.manifest_path).read_text())["status"] == "published"
    assert "is published, but the housekeeping after it failed" in caplog.text
    assert "Input/output error" in caplog.text


def test_latest_json_without_its_keys_is_a_clear_error(tmp_path):
    (tmp_path / "latest.json").write_text('{"run_id": "r", "path": "runs/x"}')
    with pytest.raises(PublishError, match="latest.json: missing or not a string: run_date"):
        publish.check_latest(str(tmp_path))
    (tmp_path / "latest.json").write_text('{"run_id": "r", "path": "runs/x", "run_date": "yesterday"}')
    with pytest.raises(PublishError, match="run_date 'yesterday' is not a YYYY-MM-DD date"):
        read_latest(str(tmp_path))


def test_an_unreadable_lock_is_explained_and_broken_only_on_request(tmp_path):
    (tmp_path / "_LOCK").write_text('{"host": "a-host", "pid": 12')  # cut short by a full disk
    old = dt.datetime.now().timestamp() - 120
    os.utime(tmp_path / "_LOCK", (old, old))
    with pytest.raises(LockHeldError) as err:
        RunLock(str(tmp_path), D2).acquire()
    assert "cannot be read" in str(err.value) and "--break-stale-lock" in str(err.value)
    assert "still running" not in str(err.value)
    with RunLock(str(tmp_path), D2, break_stale=True):
        assert json.loads((tmp_path / "_LOCK").read_text())["pid"] == os.getpid()
    # one written just now may still be being written by its creator
    (tmp_path / "_LOCK").write_text('{"host": "a-host", "pid": 12')
    with pytest.raises(LockHeldError):
        RunLock(str(tmp_path), D2, break_stale=True).acquire()


def test_corrupt_latest_is_a_clear_error(tmp_path):
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(PublishError, match="latest.json: not valid JSON"):
        read_latest(str(tmp_path))


def test_corrupt_latest_stops_publishing_before_the_run_is_marked_published(tmp_path):
    # The marker used to be written first: the run failed (exit 7) yet listed as published.
    run = begin_run(str(tmp_path), D1)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(PublishError, match="latest.json: not valid JSON"):
        publish_run(run, {})
    assert not (Path(run.path) / publish.PUBLISHED_MARKER).exists()
    assert run_status(run) != "published"


def test_a_corrupt_latest_is_repaired_by_rollback_and_does_not_hide_the_runs(tmp_path):
    """Listing and rolling back read latest.json and failed on a corrupt one, although a rollback is how
    it gets repaired; the evaluate job's lookup of a date's run failed on it too."""
    from mf_spark.evaluate.holdout import published_interactions_path

    root = tmp_path / "out"
    config = tmp_path / "job.toml"
    config.write_text(f'[input]\npath = "{tmp_path}/events"\n[output]\nroot = "{root}"\n')
    day1 = published(root, D1)
    (Path(day1.path) / "interactions").mkdir()
    (root / "latest.json").write_text("{not json")
    with pytest.raises(PublishError, match="latest.json: not valid JSON.*Nothing was run.*--to RUN_ID"):
        publish.check_latest(str(root))
    assert [r["is_latest"] for r in list_runs(str(root))] == [False]
    assert published_interactions_path(str(root), D1).endswith("interactions")
    listing = run_rollback_job(config, "--list")
    assert listing.returncode == 0 and day1.run_id in listing.stdout and "not valid JSON" in listing.stderr
    done = run_rollback_job(config, "--to", day1.run_id)
    assert done.returncode == 0, done.stderr
    assert read_latest(str(root))["run_id"] == day1.run_id
    publish.check_latest(str(root))


def test_taking_the_lock_of_a_missing_root_warns_that_it_is_created(tmp_path, caplog):
    """A mistyped output.root silently became a fresh root with new ID maps."""
    root = tmp_path / "typo"
    with caplog.at_level("WARNING", logger="mf_spark.publish"), RunLock(str(root), D1):
        pass
    assert root.is_dir()
    assert any(f"output root {root} does not exist: creating it" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mf_spark.publish"), RunLock(str(root), D1):
        pass
    assert not [r for r in caplog.records if "does not exist" in r.getMessage()]


def test_list_runs_skips_a_date_directory_retention_removes_meanwhile(tmp_path, monkeypatch):
    """rollback --list crashed (exit 1) when retention removed an emptied dt= directory between the
    listing of runs/ and the listing of that directory."""
    kept = published(tmp_path, D2)
    gone = published(tmp_path, D1)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == f"dt={D1.isoformat()}":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert [r["run_id"] for r in list_runs(str(tmp_path))] == [kept.run_id]
    assert gone.run_id


def test_list_runs_shows_the_run_the_live_lock_holder_writes_as_running(tmp_path):
    """It showed "partial", which the docs call a crashed run, removed by the next run."""
    root = str(tmp_path / "out")
    with RunLock(root, D1):
        begin_run(root, D1)
        assert [r["status"] for r in list_runs(root)] == ["running"]
    assert [r["status"] for r in list_runs(root)] == ["partial"]  # the holder is gone: a crash


def test_check_writable_root(tmp_path):
    from mf_spark.errors import ConfigError

    publish.check_writable_root(str(tmp_path / "new" / "deeper"), "x.toml")  # creatable: fine
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    for root in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ConfigError, match=rf"output.root = {root} \(from x.toml\) cannot be used: .*afile "
                                              "is not a directory. Nothing was created"):
            publish.check_writable_root(str(root), "x.toml")


def test_rollback_refuses_an_impossible_date_as_a_usage_error(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(f'[input]\npath = "{tmp_path}/events"\n[output]\nroot = "{tmp_path}"\n')
    done = run_rollback_job(config, "--date", "2011-13-08")  # exit 7, "no published run matches", before
    assert done.returncode == 2 and "not a date in YYYY-MM-DD form: '2011-13-08'" in done.stderr


def test_json_payloads_are_plain_json(tmp_path):
    path = tmp_path / "m.json"
    publish.write_json_atomic(path, {"d": D1, "nan": float("nan"), "np": np.float32(0.5), "n": np.int64(3),
                                     "s": {"b", "a"}, "p": tmp_path})
    assert json.loads(path.read_text()) == {"d": "2011-12-06", "nan": None, "np": 0.5, "n": 3, "s": ["a", "b"],
                                            "p": str(tmp_path)}


def test_manifest_base_names_run_versions_commit_and_host(tmp_path):
    run = RunDir(str(tmp_path), D1, "r1")
    base = manifest_base(run, stage="x")
    assert base["run"] == {"run_date": "2011-12-06", "run_id": "r1", "path": "runs/dt=2011-12-06/run_id=r1"}
    assert base["versions"]["spark"] == "4.3.0"
    assert base["versions"]["pyspark"] == "4.3.0"
    assert base["versions"]["numpy"] == np.__version__
    assert base["host"] == socket.gethostname()
    assert base["stage"] == "x"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert base["git_commit"] in (expected, f"{expected}-dirty")


def _git_repo(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", path.name], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_the_checkouts_own_not_an_enclosing_repositorys(tmp_path, monkeypatch):
    """Installed (not editable) into a venv inside an application's repository, the manifests recorded
    the application's commit as mf-spark's."""
    host_commit = _git_repo(tmp_path / "app")
    installed = tmp_path / "app" / ".venv" / "lib" / "site-packages" / "mf_spark"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")  # untracked: the app's repository does not hold the venv
    monkeypatch.setattr(publish, "__file__", str(installed / "publish.py"))
    assert publish.git_commit() == "unknown"

    checkout = tmp_path / "my checkout"  # a space in the path
    package = checkout / "tools" / "mf-spark" / "mf_spark"  # deeper than the top, as in a monorepo
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    _git_repo(checkout)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(checkout)]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "package"], check=True)
    checkout_commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(publish, "__file__", str(package / "publish.py"))
    assert publish.git_commit() == checkout_commit != host_commit
    (package / "new.py").write_text("X = 1\n")
    assert publish.git_commit() == f"{checkout_commit}-dirty"  # as spark-submit.sh stamps its zip


# --------------------------------------------------------------------------------------------------
# real crashes: a subprocess publishes and SIGKILLs itself at a chosen point

CRASHING_RUN = textwrap.dedent(
    """
    import datetime as dt, sys
    from pathlib import Path
    from mf_spark.publish import RunLock, begin_run, publish_run
    root, day = sys.argv[1], dt.date.fromisoformat(sys.argv[2])
    with RunLock(root, day, break_stale=True):
        run = begin_run(root, day)
        for name in ("user_factors", "recommendations"):
            Path(run.sub(name)).mkdir()
            Path(run.sub(name), "part-0.parquet").write_text("new")
        publish_run(run, {"marker": "new"}, keep_runs=1)
    """
)


def run_crashing(root: Path, day: dt.date, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MF_SPARK_FAULT": fault, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", CRASHING_RUN, str(root), day.isoformat()], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fault", ["before_manifest", "before_published_marker", "before_latest"])
def test_sigkill_before_latest_leaves_the_previous_publication(tmp_path, fault):
    old = published(tmp_path, D1, "old")
    latest_before = (tmp_path / "latest.json").read_bytes()
    result = run_crashing(tmp_path, D2, fault)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (tmp_path / "latest.json").read_bytes() == latest_before
    assert previous_published(str(tmp_path))["marker"] == "old"
    assert Path(old.sub("recommendations"), "part-0.parquet").read_text() == "old"
    assert (tmp_path / "_LOCK").exists()  # the dead run's lock stays until broken
    statuses = {r["run_id"]: r["status"] for r in list_runs(str(tmp_path))}
    crashed = [rid for rid in statuses if rid != old.run_id]
    assert len(crashed) == 1
    # once the marker is written the run is complete, just not promoted; before that it is partial
    assert statuses[crashed[0]] == ("published" if fault == "before_latest" else "partial")

    # the next run breaks the dead run's lock, cleans the partial directory and publishes
    with pytest.raises(LockHeldError, match="--break-stale-lock"):
        RunLock(str(tmp_path), D2).acquire()
    result = run_crashing(tmp_path, D2, "")
    assert result.returncode == 0, result.stderr
    latest = read_latest(str(tmp_path))
    assert latest["run_date"] == "2011-12-07"
    assert previous_published(str(tmp_path))["marker"] == "new"
    remaining = {r["run_id"]: r["status"] for r in list_runs(str(tmp_path))}
    assert remaining[latest["run_id"]] == "published"
    assert "partial" not in remaining.values()
    assert not (tmp_path / "_LOCK").exists()


def test_sigkill_after_latest_leaves_the_new_publication_complete(tmp_path):
    published(tmp_path, D1, "old")
    result = run_crashing(tmp_path, D2, "after_latest")
    assert result.returncode == -signal.SIGKILL
    assert previous_published(str(tmp_path))["marker"] == "new"
    run_dir = Path(previous_published(str(tmp_path))["run_dir"])
    assert (run_dir / "recommendations" / "part-0.parquet").read_text() == "new"
    # retention had not run yet: the old run is still there
    assert len(list_runs(str(tmp_path))) == 2


def run_rollback_job(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "rollback.py"), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_rollback_command(tmp_path):
    root = tmp_path / "out"
    config = tmp_path / "job.toml"
    config.write_text(f'[input]\npath = "{tmp_path}/events"\n[output]\nroot = "{root}"\n')
    day1 = published(root, D1)
    day2 = published(root, D2)
    listing = run_rollback_job(config, "--list")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"\* 2011-12-07\s+{day2.run_id}\s+published", listing.stdout)
    assert re.search(rf"  2011-12-06\s+{day1.run_id}\s+published", listing.stdout)
    # a failed run says why: operations.md sends a scheduler to --list for the reason
    failed = begin_run(str(root), D2)
    publish.write_failed_manifest(failed, {"error": "quality gate failed: ndcg@20 = 0.01 < minimum 0.1\nmore"})
    listing = run_rollback_job(config, "--list")
    assert re.search(rf"  2011-12-07\s+{failed.run_id}\s+failed: quality gate failed: ndcg@20 = 0\.01 < minimum "
                     r"0\.1\n", listing.stdout), listing.stdout

    done = run_rollback_job(config, "--date", "2011-12-06")
    assert done.returncode == 0, done.stderr
    assert day1.relative_path in done.stdout and day2.run_id in done.stdout
    assert read_latest(str(root))["run_id"] == day1.run_id
    assert not (root / "_LOCK").exists()

    assert run_rollback_job(config, "--to", day2.run_id).returncode == 0
    assert read_latest(str(root))["run_id"] == day2.run_id

    missing = run_rollback_job(config, "--to", "no-such-run")
    assert missing.returncode == PublishError.exit_code
    assert "no published run matches 'no-such-run'" in missing.stderr
    assert "Traceback" not in missing.stderr

    with RunLock(str(root), D3):
        held = run_rollback_job(config, "--date", "2011-12-06")
    assert held.returncode == LockHeldError.exit_code
    assert f"pid {os.getpid()}" in held.stderr
    assert read_latest(str(root))["run_id"] == day2.run_id

    assert run_rollback_job(config).returncode == 2  # one of --to/--date/--list is required


@pytest.mark.parametrize("action", [["--list"], ["--date", "2011-12-08"], ["--to", "20111209T0315Z-a1b2c3"]])
def test_rollback_on_a_missing_root_names_it_and_creates_nothing(tmp_path, action):
    """A mistyped output.root once got created by the rollback's lock, and --list called it "no runs"."""
    root = tmp_path / "typo" / "out"
    config = tmp_path / "job.toml"
    config.write_text(f'[input]\npath = "{tmp_path}/events"\n[output]\nroot = "{root}"\n')
    done = run_rollback_job(config, *action)
    assert done.returncode == 2, (done.stdout, done.stderr)  # ConfigError: fix output.root
    assert f"output.root = {root}" in done.stderr and str(config) in done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert "no runs" not in done.stdout
    assert not (tmp_path / "typo").exists()

    overridden = run_rollback_job(config, "--set", f"output.root={root}-2", *action)
    assert overridden.returncode == 2
    assert f"output.root = {root}-2 (from --set 'output.root={root}-2')" in overridden.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]


def test_rollback_on_a_root_that_is_a_file_is_refused(tmp_path):
    root = tmp_path / "out"
    root.write_text("not a directory")
    config = tmp_path / "job.toml"
    config.write_text(f'[input]\npath = "{tmp_path}/events"\n[output]\nroot = "{root}"\n')
    done = run_rollback_job(config, "--date", "2011-12-08")
    assert done.returncode == 2 and "is not a directory" in done.stderr and "Traceback" not in done.stderr
    assert root.read_text() == "not a directory"


def test_describe_latest_says_which_run_latest_json_names(tmp_path):
    """The nightly summary printed "latest: <root>/latest.json" even when publishing an older date left
    latest.json on a later run."""
    later = published(tmp_path, D4)
    assert publish.describe_latest(str(tmp_path), later) == f"{tmp_path / 'latest.json'} names this run"
    older = published(tmp_path, D2)  # a backfill of an older date: latest.json stays on D4
    line = publish.describe_latest(str(tmp_path), older)
    assert line.startswith(f"{tmp_path / 'latest.json'} left on run {later.run_id} of date 2011-12-09")
    assert "a later date stays current" in line and f"--to {older.run_id}" in line
    rollback(str(tmp_path), older.run_id)
    assert publish.describe_latest(str(tmp_path), older).endswith("names this run")


def test_sigterm_releases_the_lock(tmp_path):
    script = textwrap.dedent(
        """
        import datetime as dt, sys, time
        from mf_spark.publish import RunLock
        with RunLock(sys.argv[1], dt.date(2011, 12, 9)):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert (tmp_path / "_LOCK").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "_LOCK").exists()


def test_replace_dir_swaps_a_complete_directory_in_and_restores_the_old_one_on_failure(tmp_path, monkeypatch):
    dest = tmp_path / "recommendations"
    first = publish.temp_sibling(dest)
    assert first.parent == tmp_path and first.name.startswith(".recommendations.tmp-")
    first.mkdir()
    (first / "part-0.parquet").write_text("old")
    publish.replace_dir(first, dest)  # no table yet: a plain rename
    assert (dest / "part-0.parquet").read_text() == "old" and not first.exists()

    second = publish.temp_sibling(dest)
    second.mkdir()
    (second / "part-0.parquet").write_text("new")
    publish.replace_dir(second, dest)
    assert (dest / "part-0.parquet").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recommendations"]  # old one deleted

    with pytest.raises(ValueError, match="same directory"):
        publish.replace_dir(tmp_path / "elsewhere" / "x", dest)

    # the rename into place fails after the old table was moved aside: the old table goes back
    third = publish.temp_sibling(dest)
    third.mkdir()
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == third:
            raise OSError("injected")
        return real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        publish.replace_dir(third, dest)
    assert (dest / "part-0.parquet").read_text() == "new"


def _record_fsyncs(monkeypatch) -> list[str]:
    """Paths fsynced from now on, in order (read back from the descriptor)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(publish.os, "fsync", recording_fsync)
    return synced


def test_a_runs_tables_reach_the_disk_before_its_manifest(tmp_path, monkeypatch):
    """Spark's executors never fsync the Parquet files they write: a power loss soon after publication
    could leave latest.json (fsynced) naming tables whose data was still in the page cache."""
    run = begin_run(str(tmp_path), D1)
    fake_tables(run)
    tables = {str(p) for p in Path(run.path).rglob("*")}
    synced = _record_fsyncs(monkeypatch)
    publish_run(run, {})
    manifest_write = next(i for i, p in enumerate(synced) if Path(p).name.startswith(".manifest.json.tmp-"))
    assert tables <= set(synced[:manifest_write])
    assert run.path in synced[:manifest_write]  # the directory entries too


def test_replace_dir_flushes_the_new_directory_before_deleting_the_old(tmp_path, monkeypatch):
    dest = tmp_path / "recommendations"
    dest.mkdir()
    (dest / "part-0.parquet").write_text("old")
    new = publish.temp_sibling(dest)
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "part-0.parquet").write_text("new")
    synced = _record_fsyncs(monkeypatch)
    publish.replace_dir(new, dest)
    assert {str(new / "sub" / "part-0.parquet"), str(new / "sub"), str(new)} <= set(synced)
    assert (dest / "sub" / "part-0.parquet").read_text() == "new"


def test_signals_wait_until_a_deferred_block_is_done():
    """SIGTERM reaches a spark-submit'ed driver twice (the stopped JVM's error, then the JVM's shutdown):
    the second, turned into SystemExit by the run lock, cut the failed manifest short."""
    import signal
    import time

    from mf_spark.publish import signals_deferred

    def exit_143(signum, frame):
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, exit_143)
    written = []
    try:
        with pytest.raises(SystemExit) as stopped:
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # without the deferral SystemExit is raised here
                written.append("manifest")
        assert written == ["manifest"] and stopped.value.code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------------
# hostile or unlucky contents of the output root (a path-safety review)


def test_runs_are_never_followed_through_symbolic_links(tmp_path, caplog):
    """A linked date directory made the clean-up of crashed runs (and retention) delete outside the root;
    a linked run directory holding _PUBLISHED was marked superseded and could be rolled back to."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "run_id=x").mkdir(parents=True)
    (outside / "run_id=x" / "precious").write_text("keep me")
    (outside / ".deleting-foo").mkdir()
    (outside / "planted").mkdir()
    (outside / "planted" / publish.PUBLISHED_MARKER).write_text("")
    published(root, D1)
    (root / "runs" / "dt=2011-12-08").symlink_to(outside)
    (root / "runs" / "dt=2011-12-06" / "run_id=0000-planted").symlink_to(outside / "planted")
    with caplog.at_level("WARNING", logger="mf_spark.publish"):
        assert publish.clean_partial_runs(str(root)) == []
        published(root, D1, keep_runs=1)
        with pytest.raises(PublishError, match="no published run matches '0000-planted'"):
            rollback(str(root), "0000-planted")
    assert (outside / "run_id=x" / "precious").read_text() == "keep me"
    assert (outside / ".deleting-foo").is_dir()
    assert not (outside / "planted" / publish.SUPERSEDED_MARKER).exists()
    assert "a symbolic link under runs/" in caplog.text
    # latest.json naming a run directory that became a link: not read as the baseline
    linked = tmp_path / "linked"
    published(linked, D1)
    real = Path(list_runs(str(linked))[0]["path"])
    moved = tmp_path / "moved-run"
    (linked / real).rename(moved)
    (linked / real).symlink_to(moved)
    assert previous_published(str(linked)) is None
    assert [r["run_id"] for r in list_runs(str(root))] != [] and all(
        r["run_id"] != "0000-planted" for r in list_runs(str(root)))


def test_a_date_directory_in_another_iso_form_is_not_a_run(tmp_path):
    """dt=20111209 parsed as 2011-12-09: its run had a path no RunDir has, and every nightly crashed."""
    (tmp_path / "runs" / "dt=20111209" / "run_id=hand").mkdir(parents=True)
    (tmp_path / "runs" / "dt=2011-W49-5" / "run_id=hand").mkdir(parents=True)
    assert list_runs(str(tmp_path)) == []
    run = published(tmp_path, D4)
    assert [r["run_id"] for r in list_runs(str(tmp_path))] == [run.run_id]


@pytest.mark.parametrize("path", ["/tmp/elsewhere", "../outside", "runs/../../outside",
                                  "runs/dt=2011-12-06/run_id=r2"])
def test_latest_json_must_name_its_own_run_directory(tmp_path, path):
    """An absolute or ../ path made the warm start, the gate baseline and the space check read outside
    the root."""
    (tmp_path / "latest.json").write_text(json.dumps({"run_date": "2011-12-06", "run_id": "r1", "path": path}))
    with pytest.raises(PublishError, match=r"is not the run's directory 'runs/dt=2011-12-06/run_id=r1'"):
        read_latest(str(tmp_path))


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000])
def test_undecodable_or_too_deep_json_is_a_clear_error(tmp_path, content):
    """Non-UTF-8 bytes and deep nesting were UnicodeDecodeError and RecursionError tracebacks."""
    (tmp_path / "latest.json").write_bytes(content)
    with pytest.raises(PublishError, match="latest.json: not valid JSON"):
        read_latest(str(tmp_path))
    (tmp_path / "_LOCK").write_bytes(content)
    assert publish.read_lock(str(tmp_path))["unreadable"]


@pytest.mark.parametrize("fields", [{"pid": "abc"}, {"pid": None}, {"pid": 1, "pid_start_ticks": "x"}])
def test_a_lock_with_fields_of_the_wrong_type_is_unreadable_not_stale(tmp_path, fields):
    """pid "abc" was a ValueError traceback; start ticks "x" made a live holder's lock look stale and
    --break-stale-lock broke it."""
    lock = {"host": socket.gethostname(), "started_at": "now", "run_date": "2011-12-09", **fields}
    (tmp_path / "_LOCK").write_text(json.dumps(lock))
    assert publish.read_lock(str(tmp_path))["unreadable"]
    with pytest.raises(LockHeldError, match="cannot be read"):
        RunLock(str(tmp_path), D2, break_stale=True).acquire()  # written just now: not broken
    assert json.loads((tmp_path / "_LOCK").read_text()) == lock
    # a minute later --break-stale-lock breaks it (the moved file's token once made that look like a race)
    lock["token"] = "t0"
    (tmp_path / "_LOCK").write_text(json.dumps(lock))
    old = dt.datetime.now().timestamp() - 120
    os.utime(tmp_path / "_LOCK", (old, old))
    with RunLock(str(tmp_path), D2, break_stale=True):
        assert json.loads((tmp_path / "_LOCK").read_text())["pid"] == os.getpid()


def test_fsync_tree_skips_what_is_not_a_regular_file(tmp_path):
    """A FIFO left in a run directory blocked the publication (lock held) for ever; a dangling link
    failed it."""
    (tmp_path / "part-0.parquet").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert publish.fsync_tree(tmp_path) == 1


def test_credentials_stay_out_of_the_lock_and_the_provenance(tmp_path, monkeypatch):
    """--set spark.hadoop.fs.s3a.secret.key=... went verbatim into _LOCK and every manifest's argv."""
    monkeypatch.setattr(sys, "argv", ["jobs/nightly.py", "--set", "spark.hadoop.fs.s3a.access.key=AKIA",
                                      "--conf", "spark.hadoop.fs.s3a.secret.key=s3cr3t", "--set", "train.rank=8",
                                      "--set=spark.hadoop.fs.s3a.session.token=tok", "--date=2011-12-09"])
    expected = ["jobs/nightly.py", "--set", "spark.hadoop.fs.s3a.access.key=<redacted>",
                "--conf", "spark.hadoop.fs.s3a.secret.key=<redacted>", "--set", "train.rank=8",
                "--set=spark.hadoop.fs.s3a.session.token=<redacted>", "--date=2011-12-09"]
    with RunLock(str(tmp_path), D1):
        assert publish.read_lock(str(tmp_path))["argv"] == expected
    assert manifest_base()["argv"] == expected
    assert publish.redact_settings({"spark": {"hadoop.fs.s3a.secret.key": "x", "sql.shuffle.partitions": 2},
                                    "input": {"options": {"password": "p", "header": "true"}}}) == {
        "spark": {"hadoop.fs.s3a.secret.key": "<redacted>", "sql.shuffle.partitions": 2},
        "input": {"options": {"password": "<redacted>", "header": "true"}}}


def test_credential_named_options_are_redacted_in_both_forms():
    """--password=value and --password value were recorded verbatim (only key=value settings were covered)."""
    argv = ["job.py", "--password=hunter2", "--access-key", "AKIA", "--date", "2011-12-09", "--secret", "-x9",
            "--token"]
    assert publish.redact_argv(argv) == ["job.py", "--password=<redacted>", "--access-key", "<redacted>",
                                         "--date", "2011-12-09", "--secret", "<redacted>", "--token"]
