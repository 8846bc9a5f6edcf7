"""The nightly end to end in local mode: the output contract, the manifest and a warm-started second day."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import io
import json
import logging
import shutil
import os
import sys
import subprocess
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from mf_spark.config import load_config
from mf_spark.evaluate.models import persistent_rdd_ids
from mf_spark.pipeline import run_backfill, run_nightly

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "ingest.lookback_days=10", "train.rank=8", "train.max_iter=4", "train.warm_start_iterations=2",
    "train.num_user_blocks=2", "train.num_item_blocks=2", "recommend.top_n=10", "recommend.similar_n=5",
    "evaluate.ks=[10, 20]", "evaluate.gate.min_value=0.0",
]


@pytest.fixture(scope="module")
def filtered_items(spark, tmp_path_factory) -> tuple[Path, list[str]]:
    """An item filter of the three most bought items of both days' windows (so they have factors and
    would be neighbours of many items if the filter were ignored)."""
    events = spark.read.parquet(str(REPO / "data" / "sample" / "events"))
    top = (events.where(F.col("event_date") >= "2011-11-28").groupBy("item_id").count()
           .orderBy(F.desc("count"), "item_id").limit(3).collect())
    items = [r.item_id for r in top]
    path = tmp_path_factory.mktemp("item-filter") / "filter"
    spark.createDataFrame([(i,) for i in items], "item_id string").write.parquet(str(path))
    return path, items


@pytest.fixture(scope="module")
def two_days(spark, tmp_path_factory, filtered_items):
    root = tmp_path_factory.mktemp("nightly-root")
    # a credential in the config and on the command line: manifests are read by all who read the runs
    secret = ["spark.hadoop.fs.s3a.secret.key=hunter2"]
    cfg = load_config(REPO / "conf" / "local.toml",
                      [*SMALL, f"output.root={root}", f"recommend.item_filter_path={filtered_items[0]}", *secret])
    before = persistent_rdd_ids(spark)
    temp_files_before = set(os.listdir(spark.sparkContext._temp_dir))
    import mf_spark.recommend

    build_tables = mf_spark.recommend.build_recommendation_tables

    def recording(*args, **kwargs):
        CACHED_AT_RECOMMEND.append(persistent_rdd_ids(spark) - before)
        return build_tables(*args, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            LOGGED["two_days"].append(record.getMessage())

    recorder = Recorder(level=logging.INFO)
    pipeline_log = logging.getLogger("mf_spark.pipeline")
    level = pipeline_log.level
    pipeline_log.addHandler(recorder)
    pipeline_log.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mf_spark.recommend, "build_recommendation_tables", recording)
            patch.setattr(sys, "argv", ["jobs/nightly.py", "--set", *secret])
            first = run_nightly(spark, cfg, dt.date(2011, 12, 8), print_summary=False)
            second = run_nightly(spark, cfg, dt.date(2011, 12, 9), print_summary=True)
    finally:
        pipeline_log.removeHandler(recorder)
        pipeline_log.setLevel(level)
    LEFT_CACHED["two_days"] = persistent_rdd_ids(spark) - before
    LEFT_TEMP_FILES["two_days"] = set(os.listdir(spark.sparkContext._temp_dir)) - temp_files_before
    return root, first, second


#: RDDs a fixture's nightlies left persisted, and PySpark driver temp files (one per live broadcast)
#: they left behind (filled by the fixtures).
LEFT_CACHED: dict[str, frozenset[int]] = {}
LEFT_TEMP_FILES: dict[str, set[str]] = {}
#: mf_spark.pipeline's log lines during a fixture's nightlies.
LOGGED: dict[str, list[str]] = {"two_days": []}
#: RDDs the run had persisted when the recommend stage started, per nightly of two_days.
CACHED_AT_RECOMMEND: list[frozenset[int]] = []


def test_a_passing_gate_says_so_in_the_log(two_days):
    """The gate's verdict was only in manifest.json when it passed; the docs promise it in the log."""
    passed = [line for line in LOGGED["two_days"] if line.startswith("quality gate passed: ndcg@20 = ")]
    assert len(passed) == 2, LOGGED["two_days"]
    assert "previous" in passed[1]  # the second night is compared with the first


def test_a_nightly_releases_what_it_cached(two_days):
    """A backfill runs its dates in one session: each date left its interactions, rejects and both factor
    tables cached on the executors (a 30-day backfill, 30 copies of the factors)."""
    assert LEFT_CACHED["two_days"] == frozenset()


def test_written_tables_are_not_kept_cached_for_the_later_stages(two_days):
    """Recommend and evaluate read the written interactions and factors, yet the caches of ingest's
    interactions and rejects and of both factor tables held executor memory until the run ended (at 2B
    interactions about 58 GB, while ALS and top-N needed it)."""
    assert CACHED_AT_RECOMMEND == [frozenset(), frozenset()]


def test_a_nightly_destroys_its_broadcasts(two_days):
    """Training, top-N, similar items and the evaluation each broadcast factors; every broadcast kept a
    driver temp file until the session ended, so a backfill's driver disk grew with every date."""
    assert LEFT_TEMP_FILES["two_days"] == set()


def schema_of(spark, path: str) -> dict[str, str]:
    return {f.name: f.dataType.simpleString() for f in spark.read.parquet(path).schema.fields}


def test_outputs_follow_the_contract(spark, two_days):
    root, _, second = two_days
    run = Path(second.run_dir)
    assert schema_of(spark, str(run / "recommendations")) == {
        "user_id": "string", "rank": "int", "item_id": "string", "score": "float"}
    assert schema_of(spark, str(run / "similar_items")) == {
        "item_id": "string", "rank": "int", "similar_item_id": "string", "score": "float"}
    assert schema_of(spark, str(run / "user_factors")) == {"id": "int", "user_id": "string", "features": "array<float>"}
    assert schema_of(spark, str(run / "item_factors")) == {"id": "int", "item_id": "string", "features": "array<float>"}
    interactions = schema_of(spark, str(run / "interactions"))
    assert {k: interactions[k] for k in ("user_idx", "item_idx", "strength")} == {
        "user_idx": "int", "item_idx": "int", "strength": "float"}
    assert (run / "evaluation" / "metrics.json").exists()
    assert list((run / "evaluation").glob("*.png"))

    recs = spark.read.parquet(str(run / "recommendations"))
    assert recs.where(F.col("user_id").isNull() | F.col("item_id").isNull() | F.isnan("score")).count() == 0
    per_user = recs.groupBy("user_id").agg(F.count("*").alias("n"), F.min("rank").alias("lo"),
                                            F.max("rank").alias("hi"), F.countDistinct("rank").alias("d"))
    assert per_user.where((F.col("lo") != 1) | (F.col("hi") != F.col("n")) | (F.col("d") != F.col("n"))).count() == 0
    assert per_user.agg(F.max("n")).first()[0] == 10
    # seen items are excluded
    inter = spark.read.parquet(str(run / "interactions"))
    users = spark.read.parquet(str(run / "user_factors")).select(F.col("id").alias("user_idx"), "user_id")
    items = spark.read.parquet(str(run / "item_factors")).select(F.col("id").alias("item_idx"), "item_id")
    seen = inter.join(users, "user_idx").join(items, "item_idx").select("user_id", "item_id")
    assert recs.join(seen, ["user_id", "item_id"], "inner").count() == 0
    sims = spark.read.parquet(str(run / "similar_items"))
    assert sims.where(F.col("item_id") == F.col("similar_item_id")).count() == 0


def test_filtered_items_are_never_recommended_nor_anyones_similar_item(spark, two_days, filtered_items):
    """The nightly builds its tables as jobs/recommend.py does (docs/recommend.md: filtered items are
    never recommended and keep their own similar-items list); it once left them in similar_items."""
    _, _, second = two_days
    run, items = Path(second.run_dir), filtered_items[1]
    item_factors = spark.read.parquet(str(run / "item_factors"))
    assert item_factors.where(F.col("item_id").isin(items)).count() == len(items)  # the filter bites
    recs = spark.read.parquet(str(run / "recommendations"))
    sims = spark.read.parquet(str(run / "similar_items"))
    assert recs.where(F.col("item_id").isin(items)).count() == 0
    assert sims.where(F.col("similar_item_id").isin(items)).count() == 0
    assert sims.where(F.col("item_id").isin(items)).select("item_id").distinct().count() == len(items)


def test_recommend_settings_follow_the_config():
    """broadcast_max_mb and fold_in_new_users reach the nightly's recommend stage (it ignored both)."""
    from mf_spark.pipeline import recommend_settings_from

    cfg = load_config(REPO / "conf" / "local.toml", [
        "recommend.broadcast_max_mb=3", "recommend.fold_in_new_users=false", "recommend.top_n=7",
        "recommend.user_block_size=16", "train.alpha=2.5"])
    settings = recommend_settings_from(cfg)
    assert settings.max_broadcast_bytes == 3 * 2**20
    assert settings.fold_in_new_users is False
    assert (settings.top_n, settings.user_block_size, settings.solve_params.alpha) == (7, 16, 2.5)
    assert settings.solve_params.solver == "cholesky"  # fold-in always solves exactly


def test_manifest_and_latest(two_days):
    root, first, second = two_days
    latest = json.loads((Path(root) / "latest.json").read_text())
    assert latest["run_id"] == second.manifest["run"]["run_id"]
    manifest = json.loads((Path(second.run_dir) / "manifest.json").read_text())
    assert manifest["status"] == "published"
    for key in ("ingest", "train", "metrics", "outputs", "id_maps", "timings", "parameters"):
        assert key in manifest, key
    assert "hunter2" not in (Path(second.run_dir) / "manifest.json").read_text()
    assert manifest["parameters"]["spark"]["hadoop.fs.s3a.secret.key"] == "<redacted>"
    assert manifest["argv"] == ["jobs/nightly.py", "--set", "spark.hadoop.fs.s3a.secret.key=<redacted>"]
    assert manifest["ingest"]["rows_read"] == (manifest["ingest"]["accepted_events"] + manifest["ingest"]["rejected"]
                                               + manifest["ingest"]["deduplicated"])
    assert set(manifest["timings"]) >= {"ingest", "train", "recommend", "evaluate"}  # publish ends after the manifest is written
    assert manifest["outputs"]["recommendations"] > 0
    # who got no list was visible only by comparing counts
    coverage = manifest["coverage"]
    import pyarrow.parquet as pq

    recs = pq.read_table(Path(second.run_dir) / "recommendations").column("user_id").to_pylist()
    assert coverage["users_with_recommendations"] == len(set(recs)) <= coverage["users"] == manifest["outputs"]["user_factors"]
    assert coverage["items_with_similar_items"] <= coverage["items"] == manifest["outputs"]["item_factors"]
    assert any(line.startswith(f"recommend: {coverage['users_with_recommendations']} of {coverage['users']} users got "
                               "a list") for line in LOGGED["two_days"])
    # day two was warm-started from day one, with fewer iterations
    assert manifest["train"]["warm_start_from"] == first.manifest["run"]["run_id"]
    assert len(manifest["train"]["training_loss"]) == 2
    assert first.manifest["train"]["warm_start_from"] is None
    # which run was the baseline and the warm start was only in the manifest (it matters after a rollback)
    first_id = first.manifest["run"]["run_id"]
    assert LOGGED["two_days"].count("baseline (warm start and gate): none (cold start)") == 1
    assert f"baseline (warm start and gate): run {first_id} of {first.manifest['run']['run_date']}" in LOGGED["two_days"]
    assert "train: cold start, 4 iterations" in LOGGED["two_days"]
    assert f"train: warm start from run {first_id}, 2 iterations" in LOGGED["two_days"]



# --------------------------------------------------------------------------------------------------
# arguments checked before Spark starts, and spark-submit.sh's own help


def nightly_job():
    """jobs/nightly.py as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nightly_job", REPO / "jobs" / "nightly.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUTURE = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)).isoformat()


@pytest.mark.parametrize("argv, message", [
    (["--from", "2011-12-09", "--to", "2011-12-01"], "--from 2011-12-09 is after --to 2011-12-01"),
    (["--date", "2011-12-09", "--skip-empty-days"], "--skip-empty-days applies only to a backfill"),
    # a typo'd future date published and then held latest.json for ever (later dates never move it)
    (["--date", FUTURE], f"run date {FUTURE} is in the future (today is "),
    (["--from", "2011-12-09", "--to", "2052-11-28"], "run date 2052-11-28 is in the future (today is "),
])
def test_bad_date_arguments_exit_2_before_spark_starts(argv, message, tmp_path, monkeypatch, capsys):
    """--from after --to exited 1 once Spark had started; the docs promise 2 and nothing started."""
    import mf_spark.session
    from mf_spark.cli import run_job

    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr(mf_spark.session, "build_session", no_spark)
    job = nightly_job()
    root = tmp_path / "out"
    command = ["--config", str(REPO / "conf" / "local.toml"), "--set", f"output.root={root}", *argv]
    code = run_job("mf-spark-nightly", job.__doc__, job.body, job.add_arguments, argv=command,
                   validate_args=job.check_dates)
    assert code == 2
    err = capsys.readouterr().err
    # A usage error, argparse-style: these are the command line's mistakes, not the config file's.
    assert f"error: {message}" in err and "usage:" in err and "config error" not in err
    assert not root.exists()


def test_every_job_ends_with_its_timing(monkeypatch, caplog):
    """The standalone jobs printed no timing at all (ingest was silent for 45 s, then done)."""
    import mf_spark.session
    from mf_spark.cli import run_job

    class FakeSession:
        def stop(self):
            pass

    monkeypatch.setattr(mf_spark.session, "build_session", lambda *a, **k: FakeSession())
    with caplog.at_level(logging.INFO, logger="mf_spark"):
        assert run_job("mf-spark-x", "x", lambda spark, cfg, args: 0,
                       argv=["--config", str(REPO / "conf" / "local.toml")]) == 0
    assert [r.getMessage() for r in caplog.records if "finished in" in r.getMessage()][0].startswith(
        "mf-spark-x finished in ")


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback and exited 1 (a bug, by the exit code table)."""
    import mf_spark.session
    from mf_spark.cli import run_job

    stopped = []

    class FakeSession:
        def stop(self):
            stopped.append(True)

    def body(spark, cfg, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mf_spark.session, "build_session", lambda *a, **k: FakeSession())
    code = run_job("x", "x", body, argv=["--config", str(REPO / "conf" / "local.toml")])
    assert code == 130 and stopped
    assert "error: interrupted; nothing was published" in capsys.readouterr().err

    def raising(error, **attributes):  # what run_nightly / run_backfill attach on the way out
        def failing_body(spark, cfg, args):
            for name, value in attributes.items():
                setattr(error, name, value)
            raise error
        return failing_body

    argv = ["--config", str(REPO / "conf" / "local.toml")]
    run = "runs/dt=2011-12-09/run_id=r"
    for body, expected in (
        (raising(KeyboardInterrupt(), published_run=run), f"interrupted after {run} was published"),
        (raising(KeyboardInterrupt(), backfill_note="backfill stopped at 2011-12-03; published before it: 2011-12-01"),
         "error: backfill stopped at 2011-12-03; published before it: 2011-12-01"),
    ):
        code = run_job("x", "x", body, argv=argv)
        err = capsys.readouterr().err
        assert code == 130 and expected in err and "nothing was published" not in err
    with pytest.raises(RuntimeError, match="summary failed"):
        run_job("x", "x", raising(RuntimeError("summary failed"), published_run=run), argv=argv)
    assert f"RuntimeError after {run} was published: consumers read it" in capsys.readouterr().err

    # a full disk in any job: its own exit code and a line naming the file, not a traceback (exit 1)
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/out/ingest/dt=2011-12-09/report.json")
    java = RuntimeError("An error occurred while calling o88.parquet.\n: org.apache.spark.SparkException: "
                        "Job aborted.\n\tat x\nCaused by: java.io.IOException: No space left on device\n\tat y")
    for error, named in ((full, "(/out/ingest/dt=2011-12-09/report.json)"),
                         (java, "(org.apache.spark.SparkException: Job aborted.)")):
        assert run_job("x", "x", raising(error), argv=argv) == 8
        err = capsys.readouterr().err
        assert f"error: no space left on device {named}; free space on that disk and rerun" in err
    with pytest.raises(OSError):  # after publication it is no longer the job's failure to report so
        run_job("x", "x", raising(OSError(errno.ENOSPC, "No space left on device"), published_run=run), argv=argv)

    # a file removed under a reading job (retention and a standalone evaluate): exit 3 and one line, not
    # a Java stack and exit 1 ("a bug")
    gone = RuntimeError("An error occurred while calling o120.count.\n: org.apache.spark.SparkException: Job "
                        "aborted due to stage failure: Lost task 0.0: [FAILED_READ_FILE.FILE_NOT_EXIST] File "
                        "file:/out/runs/dt=2011-12-08/run_id=r/interactions/part-0.parquet does not exist "
                        "SQLSTATE: 42K03\n\tat x")
    capsys.readouterr()
    assert run_job("x", "x", raising(gone), argv=argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: an input file could not be read while the job ran: [FAILED_READ_FILE.FILE_NOT_"
                          "EXIST] File file:/out/runs/dt=2011-12-08/run_id=r/interactions/part-0.parquet does not "
                          "exist. A run that retention (publish.keep_runs) removed"), err
    with pytest.raises(RuntimeError):
        run_job("x", "x", raising(RuntimeError("[FAILED_READ_FILE.FILE_NOT_EXIST] x"), published_run=run), argv=argv)


def test_spark_submit_sh_help_exits_0():
    """--help printed the usage to stderr and exited 2, like a usage error."""
    for flag in ("--help", "-h"):
        done = subprocess.run(["./spark-submit.sh", flag], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "./spark-submit.sh [spark-submit options] jobs/<job>.py [job arguments]" in done.stdout
        assert "MF_SPARK_VENV_ARCHIVE" in done.stdout and done.stderr == ""
    done = subprocess.run(["./spark-submit.sh"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no job file given" in done.stderr and done.stdout == ""


# --------------------------------------------------------------------------------------------------
# a backfill across a date without events (tiny synthetic input, one-day window)

GAP = [dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)]  # no event on the middle date


@pytest.fixture(scope="module")
def events_with_a_gap(tmp_path_factory) -> Path:
    """Hive-partitioned purchases on the first and last date of GAP only: 6 users, 5 items."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("gap-events")
    for day in (GAP[0], GAP[2]):
        rows = [
            {"user_id": f"u{u}", "item_id": f"i{(u + k) % 5}", "event_type": "purchase", "value": 1.0,
             "event_ts": dt.datetime(day.year, day.month, day.day, 9 + k, tzinfo=dt.timezone.utc)}
            for u in range(6) for k in range(3)
        ]
        part = path / f"event_date={day.isoformat()}"
        part.mkdir()
        pq.write_table(pa.Table.from_pylist(rows), part / "part-0.parquet")
    return path


def gap_config(root: Path, events: Path) -> dict:
    return load_config(REPO / "conf" / "local.toml", [
        f"input.path={events}", f"output.root={root}", "ingest.lookback_days=1", "train.rank=2",
        "train.max_iter=2", "train.warm_start_iterations=1", "recommend.top_n=3", "recommend.similar_n=2",
        "evaluate.enabled=false",
    ])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def backfill_with_a_gap(spark, tmp_path_factory, events_with_a_gap):
    """A --skip-empty-days backfill over GAP, then a rerun of its first (older) date."""
    root = tmp_path_factory.mktemp("gap-root")
    cfg = gap_config(root, events_with_a_gap)
    warnings = _Records()
    logger = logging.getLogger("mf_spark.pipeline")
    logger.addHandler(warnings)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            results = run_backfill(spark, cfg, GAP[0], GAP[2], skip_empty_days=True)
            split = len(printed.getvalue())
            rerun = run_nightly(spark, cfg, GAP[0])  # an older date than latest.json's: latest stays
    finally:
        logger.removeHandler(warnings)
    text = printed.getvalue()
    return root, results, rerun, text[:split], text[split:], warnings.records


def test_backfill_skips_a_date_without_events_when_asked(backfill_with_a_gap):
    from mf_spark.publish import list_runs, read_latest

    root, results, _, printed, _, warnings = backfill_with_a_gap
    assert [r.manifest["run"]["run_date"] for r in results] == ["2024-03-01", "2024-03-03"]
    # the third date went on, warm-started from the first
    assert results[1].manifest["train"]["warm_start_from"] == results[0].manifest["run"]["run_id"]
    assert [w.getMessage() for w in warnings if "skipped 2024-03-02" in w.getMessage()]
    assert "backfill: skipped 1 date(s) with no events: 2024-03-02" in printed
    # the skipped date's failed run is kept, as for any failed run
    failed = [r for r in list_runs(str(root)) if r["run_date"] == "2024-03-02"]
    assert [r["status"] for r in failed] == ["failed"]
    manifest = json.loads((Path(root) / failed[0]["path"] / "manifest.json").read_text())
    assert "no events in the window 2024-03-02 .. 2024-03-02" in manifest["error"]
    assert read_latest(str(root))["run_id"] == results[1].manifest["run"]["run_id"]


def test_run_summary_says_which_run_latest_json_names(backfill_with_a_gap):
    """The summary printed "latest: <root>/latest.json" also when latest.json stayed on a later date."""
    root, results, rerun, printed, rerun_printed, _ = backfill_with_a_gap
    latest = Path(root) / "latest.json"
    assert f"latest:        {latest} names this run" in printed
    later = results[1].manifest["run"]["run_id"]
    assert f"latest:        {latest} left on run {later} of date 2024-03-03" in rerun_printed
    assert "names this run" not in rerun_printed
    # evaluate.enabled = false: no evaluation/ directory, so the summary must not list one
    assert "  recommendations  " in printed and "  evaluation " not in printed
    assert json.loads(latest.read_text())["run_id"] == later
    assert rerun.manifest["run"]["run_id"] != later
    # the rerun of the first date starts cold, as its first run did: a baseline of None made the warm
    # start look the run up again without the date, which gave latest.json's later run
    assert rerun.manifest["baseline_run"] is None and rerun.manifest["train"]["warm_start_from"] is None


def test_a_date_without_events_still_fails_without_the_flag(spark, tmp_path, events_with_a_gap):
    from mf_spark.errors import InputDataError, NoEventsError

    cfg = gap_config(tmp_path / "out", events_with_a_gap)
    with pytest.raises(NoEventsError, match="no events in the window") as single:
        run_nightly(spark, cfg, GAP[1])
    assert isinstance(single.value, InputDataError) and single.value.exit_code == 3
    with pytest.raises(NoEventsError) as backfill:
        run_backfill(spark, cfg, GAP[1], GAP[2])
    message = str(backfill.value)
    assert message.startswith("backfill stopped at 2024-03-02: no events in the window")
    assert "Resume with --from 2024-03-02 --to 2024-03-03" in message and "--skip-empty-days" in message
    # skipping every date publishes nothing: that is an error, not a success
    with pytest.raises(NoEventsError, match="no date had events"):
        run_backfill(spark, cfg, GAP[1], GAP[1], skip_empty_days=True)
    assert not (tmp_path / "out" / "latest.json").exists()


def test_out_of_space_is_the_disk_and_not_a_path_or_a_bug_in_a_handler():
    import errno

    from mf_spark.errors import out_of_space

    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert out_of_space(enospc)
    assert out_of_space(RuntimeError("o1.save.\n: org.apache.hadoop.fs.FSError: java.io.IOException: No space "
                                     "left on device\n\tat x"))
    try:
        raise RuntimeError("wrapped") from enospc
    except RuntimeError as wrapped:
        assert out_of_space(wrapped)
    # not: a path that merely contains the words, a bug raised while handling ENOSPC, a "from None"
    assert not out_of_space(FileNotFoundError(errno.ENOENT, "No such file", "/data/No space left on device.csv"))
    def bad_value():
        raise ValueError("bad")

    for replace in (lambda: 1 + "x", bad_value):
        try:
            try:
                raise enospc
            except OSError:
                replace()
        except (TypeError, ValueError) as later:
            assert later.__context__ is enospc and not out_of_space(later)

    class JvmGone(Exception):  # a Py4J error's str() asks the JVM, which may have exited
        def __str__(self):
            raise ConnectionRefusedError(111, "Connection refused")

    assert not out_of_space(JvmGone())


def test_a_full_disk_leaves_a_failed_manifest_and_frees_the_tables(spark, tmp_path, events_with_a_gap,
                                                                   monkeypatch):
    """On a full output disk the failed-manifest write failed too (ENOSPC): the run had no record and the
    next run deleted it as a crash's; the job exited 1 with a traceback ending in a bare OSError."""
    import errno

    import mf_spark.publish
    from mf_spark.errors import OutOfSpaceError
    from mf_spark.publish import list_runs

    root = tmp_path / "out"
    real_write = mf_spark.publish.write_json_atomic

    def disk_full_while_tables_exist(path, payload):
        if Path(path).name == "manifest.json" and any(p.is_dir() for p in Path(path).parent.iterdir()):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, payload)

    def publish_on_a_full_disk(run, manifest, keep_runs=None):
        raise OSError(errno.ENOSPC, "No space left on device", f"{run.path}/manifest.json.tmp")

    monkeypatch.setattr(mf_spark.publish, "write_json_atomic", disk_full_while_tables_exist)
    monkeypatch.setattr(mf_spark.publish, "publish_run", publish_on_a_full_disk)
    with pytest.raises(OutOfSpaceError, match=r"^no space left on device in stage publish \(.*manifest\.json\.tmp\); "
                                              r"nothing was published.*tables were removed to free space\. Free "
                                              rf"space on that disk \(output\.root = {root}, ") as raised:
        run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=False)
    assert raised.value.exit_code == 8
    [run] = list_runs(str(root))
    run_dir = root / run["path"]
    assert run["status"] == "failed" and sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]
    assert json.loads((run_dir / "manifest.json").read_text())["error"] == str(raised.value)
    assert not (root / "latest.json").exists()


def test_an_error_whose_text_needs_the_gone_jvm_still_leaves_a_failed_manifest(spark, tmp_path, events_with_a_gap,
                                                                               monkeypatch):
    """A Py4J error reads its text from the JVM: after SIGTERM to spark-submit the JVM was gone, reading
    it raised inside the failure handler, and the run got no manifest (seen once in the SIGTERM fault
    test), so the next run deleted it as a crash's, with the only word of why."""
    import mf_spark.pipeline
    from mf_spark.publish import list_runs

    class JavaErrorOfAGoneJvm(Exception):
        def __str__(self):
            raise ConnectionRefusedError("the gateway is gone")

    def broken(*args, **kwargs):
        raise JavaErrorOfAGoneJvm()

    monkeypatch.setattr(mf_spark.pipeline, "build_estimator", broken)
    root = tmp_path / "out"
    for stopped, error in ((True, "the Spark driver stopped during the run (spark-submit got SIGTERM"),
                           (False, "JavaErrorOfAGoneJvm: (its message could not be read: the Spark driver is gone)")):
        monkeypatch.setattr(mf_spark.pipeline, "spark_context_stopped", lambda spark, stopped=stopped: stopped)
        with pytest.raises(JavaErrorOfAGoneJvm):
            run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=False)
        errors = [json.loads((root / r["path"] / "manifest.json").read_text())["error"]
                  for r in list_runs(str(root)) if r["status"] == "failed"]
        assert any(e.startswith(error) for e in errors), errors


def test_an_unexpected_failure_still_leaves_a_failed_manifest(spark, tmp_path, events_with_a_gap, monkeypatch,
                                                               caplog):
    """Only PipelineErrors wrote the failed manifest; a bug (or a Java error) left a run directory
    without one, which list_runs calls "partial" with no word of why."""
    import mf_spark.pipeline
    import mf_spark.publish
    from mf_spark.publish import list_runs

    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(mf_spark.pipeline, "build_estimator", broken)
    root = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mf_spark"), pytest.raises(RuntimeError, match="solver exploded"):
        run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=False)
    [run] = list_runs(str(root))
    assert run["status"] == "failed"
    manifest = json.loads((root / run["path"] / "manifest.json").read_text())
    assert manifest["error"] == "RuntimeError: solver exploded" and "ingest" in manifest["timings"]
    assert not (root / "latest.json").exists()
    # the nightly created the root itself before the lock could see it was missing: no warning came
    assert any(f"output root {root} does not exist: creating it" in r.getMessage() for r in caplog.records)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM (a scheduler's timeout), which the lock turns into SystemExit(143): that one
    # left a "partial" run, which the next run deleted with its only record of why
    for signal, error in ((KeyboardInterrupt(), "interrupted (SIGINT)"),
                          (SystemExit(143), "terminated (exit 143; SIGTERM gives 143)")):
        def stopped(*args, signal=signal, **kwargs):
            raise signal

        monkeypatch.setattr(mf_spark.pipeline, "build_estimator", stopped)
        with pytest.raises(type(signal)):
            run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=False)
        statuses = [(r["status"], json.loads((root / r["path"] / "manifest.json").read_text())["error"])
                    for r in list_runs(str(root))]
        assert ("failed", error) in statuses

    # Ctrl-C once latest.json names the run: consumers read it, so it stays published, not "failed"
    monkeypatch.undo()
    monkeypatch.setattr(mf_spark.publish, "apply_retention", interrupted)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=False)
    latest = json.loads((root / "latest.json").read_text())
    assert interrupt.value.published_run == latest["path"]
    assert json.loads((root / latest["path"] / "manifest.json").read_text())["status"] == "published"

    # ...and in the closing summary, past that try: the CLI printed "nothing was published"
    monkeypatch.undo()
    monkeypatch.setattr(mf_spark.pipeline, "print_run_summary", interrupted)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        run_nightly(spark, gap_config(root, events_with_a_gap), GAP[0], print_summary=True)
    assert interrupt.value.published_run == json.loads((root / "latest.json").read_text())["path"]

    # a backfill interrupted at its last date: the dates before it were published, and it says so
    monkeypatch.undo()
    real_nightly = mf_spark.pipeline.run_nightly

    def nightly_interrupted_on_the_last_day(spark, cfg, day, **kwargs):
        if day == GAP[2]:
            raise KeyboardInterrupt
        return real_nightly(spark, cfg, day, **kwargs)

    monkeypatch.setattr(mf_spark.pipeline, "run_nightly", nightly_interrupted_on_the_last_day)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        mf_spark.pipeline.run_backfill(spark, gap_config(root, events_with_a_gap), GAP[0], GAP[2],
                                       skip_empty_days=True)
    assert interrupt.value.backfill_note == ("backfill stopped at 2024-03-03; published before it: 2024-03-01. "
                                             "Resume with --from 2024-03-03 --to 2024-03-03")


def test_a_nightly_with_no_interaction_left_keeps_the_rejects_in_its_failed_run(spark, tmp_path, events_with_a_gap):
    from mf_spark.errors import NoInteractionsLeftError
    from mf_spark.publish import list_runs

    root = tmp_path / "out"
    cfg = gap_config(root, events_with_a_gap)
    cfg["ingest"]["min_events_per_user"] = 100  # nobody has that many: every pair is below the support
    with pytest.raises(NoInteractionsLeftError, match="no interaction left") as info:
        run_nightly(spark, cfg, GAP[0], print_summary=False)
    [run] = list_runs(str(root))
    rejects = root / run["path"] / "rejects"
    assert run["status"] == "failed" and str(rejects) in str(info.value)
    assert {r.reason for r in spark.read.parquet(str(rejects)).collect()} == {"below_min_support"}


def test_a_backfill_says_which_of_its_runs_retention_removed(spark, tmp_path, events_with_a_gap, caplog):
    """Retention keeps the newest run dates, so a backfill's older runs go as later ones are published;
    the backfill logged each as published and never said that most were gone."""
    from mf_spark.publish import list_runs

    root = tmp_path / "out"
    cfg = gap_config(root, events_with_a_gap)
    cfg["ingest"]["lookback_days"] = 3  # every date of GAP has events in its window
    cfg["publish"]["keep_runs"] = 1
    import mf_spark.pipeline
    from mf_spark.publish import read_lock

    holders = []
    real_run_nightly = mf_spark.pipeline.run_nightly

    def spy(*args, **kwargs):  # the lock between two dates: it was released and retaken per date
        holders.append(read_lock(str(root)))
        return real_run_nightly(*args, **kwargs)

    printed = io.StringIO()
    with (caplog.at_level(logging.WARNING, logger="mf_spark"), contextlib.redirect_stdout(printed),
          pytest.MonkeyPatch.context() as patch):
        patch.setattr(mf_spark.pipeline, "run_nightly", spy)
        # and a disk with less room than a run takes: each warm-started date warns before it starts
        patch.setattr(mf_spark.publish, "disk_usage_of", lambda root: 1024)
        results = run_backfill(spark, cfg, GAP[0], GAP[2])
    assert len(results) == 3
    assert [(h or {}).get("purpose") for h in holders] == ["backfill"] * 3
    assert len({h["token"] for h in holders}) == 1 and read_lock(str(root)) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("it will remove backfilled runs" in w and "--set publish.keep_runs=3" in w for w in warnings)
    low = [w for w in warnings if "MiB free and the previous run" in w and "may run out of space (exit 8)" in w]
    assert len(low) == 2  # dates 2 and 3; the first has no previous run
    # each publication keeps the run latest.json named before it (consumers may be reading it)
    expected = ("backfill: retention has removed 1 of the 3 run(s) this backfill published (2024-03-01): "
                "publish.keep_runs = 1 keeps the newest run dates")
    assert expected in printed.getvalue() and expected in warnings
    assert [r["run_date"] for r in list_runs(str(root))] == ["2024-03-02", "2024-03-03"]


def test_the_backfill_retention_warning_counts_dates_not_runs(monkeypatch, caplog):
    """Retention keeps run dates; reruns (superseded runs) of a later date made the warning fire, and
    suggested a keep_runs of dates plus runs."""
    import mf_spark.pipeline
    from mf_spark import publish

    later = [{"run_date": f"2011-12-{d}", "status": s}
             for d in (10, 11, 12) for s in ("published", "superseded", "superseded")]
    monkeypatch.setattr(publish, "list_runs", lambda root: later)
    with caplog.at_level(logging.WARNING, logger="mf_spark"):
        mf_spark.pipeline.warn_about_retention("root", dt.date(2011, 12, 1), dt.date(2011, 12, 3), keep_runs=6)
        assert not caplog.records  # 3 later dates + 3 backfilled ones fit in 6
        mf_spark.pipeline.warn_about_retention("root", dt.date(2011, 12, 1), dt.date(2011, 12, 3), keep_runs=5)
    assert "with 3 later date(s) published after 2011-12-03" in caplog.text
    assert "--set publish.keep_runs=6" in caplog.text


def test_warm_start_from_damaged_or_missing_factors_is_a_cold_start_with_a_warning(spark, tmp_path, caplog):
    """A truncated factor file of the baseline run crashed every later nightly (each picks the same
    baseline) with a Py4J traceback; missing factor directories gave a silent cold start."""
    from mf_spark.pipeline import load_warm_start

    run = tmp_path / "runs" / "dt=2011-12-08" / "run_id=r"
    previous = {"run_path": "runs/dt=2011-12-08/run_id=r", "parameters": {"train": {"rank": 2}}}
    for side in ("user", "item"):
        spark.createDataFrame([(0, [1.0, 2.0]), (1, [3.0, 4.0])], "id int, features array<float>") \
            .coalesce(1).write.parquet(str(run / f"{side}_factors"))
    model, baseline = load_warm_start(spark, str(tmp_path), 2, previous)
    assert baseline is previous and model.userFactors.count() == 2
    # a lost executor or a stopped context is not the files' fault: it fails the run
    from mf_spark import pipeline

    from pyspark.errors import PySparkException

    assert not pipeline._unreadable_files(RuntimeError("[FAILED_READ_FILE.NO_HINT] ... BlockMissingException"))
    assert pipeline._unreadable_files(RuntimeError("[FAILED_READ_FILE.CANNOT_READ_FILE_FOOTER] Encountered error"))

    def lost_executor(self):
        raise PySparkException(message="Job aborted due to stage failure: ExecutorLostFailure")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(spark.range(1)), "count", lost_executor)  # the session's concrete DataFrame class
        with pytest.raises(PySparkException, match="ExecutorLostFailure"):
            load_warm_start(spark, str(tmp_path), 2, previous)

    with caplog.at_level(logging.WARNING, logger="mf_spark"):
        assert load_warm_start(spark, str(tmp_path), 3, {**previous, "parameters": {}}) == (None, None)
        assert "vectors are null or not of rank 3: cold start" in caplog.text
        spark.createDataFrame([(0, [1.0, 2.0]), (1, None)], "id int, features array<float>") \
            .coalesce(1).write.mode("overwrite").parquet(str(run / "item_factors"))
        caplog.clear()
        assert load_warm_start(spark, str(tmp_path), 2, previous) == (None, None)
        assert "item factors" in caplog.text and "1 vectors are null or not of rank 2" in caplog.text
        [part] = (run / "user_factors").glob("part-*.parquet")
        part.write_bytes(part.read_bytes()[:100])
        for crc in (run / "user_factors").glob(".*.crc"):
            crc.unlink()
        assert load_warm_start(spark, str(tmp_path), 2, previous) == (None, None)
        assert "factors in" in caplog.text and "cannot be read" in caplog.text
        shutil.rmtree(run / "user_factors")
        assert load_warm_start(spark, str(tmp_path), 2, previous) == (None, None)
        assert "has no user_factors/ and item_factors/: cold start" in caplog.text


def test_a_damaged_baseline_manifest_fails_the_run_with_a_record_of_why(spark, tmp_path, events_with_a_gap):
    """The baseline lookup ran before the run's try: a truncated manifest of the previous run left an
    empty run directory ("partial") and no failed manifest saying why."""
    from mf_spark.errors import PublishError

    root = tmp_path / "out"
    cfg = gap_config(root, events_with_a_gap)
    cfg["ingest"]["lookback_days"] = 3
    first = run_nightly(spark, cfg, GAP[0], print_summary=False)
    damaged = Path(first.run_dir) / "manifest.json"
    damaged.write_text(damaged.read_text()[:40])
    with pytest.raises(PublishError):
        run_nightly(spark, cfg, GAP[2], print_summary=False)
    [failed] = list((root / "runs" / f"dt={GAP[2]}").glob("run_id=*"))
    record = json.loads((failed / "manifest.json").read_text())
    assert record["status"] == "failed" and str(damaged) in record["error"]
