"""The job command lines: argument mistakes caught before Spark starts, and the standalone job chain
ingest -> train -> recommend that docs/operations.md documents."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import DAY, REPO_ROOT, SMALL_NIGHTLY, base_env, read_table, run_submit

MINIMAL = '[input]\npath = "data/sample/events"\n[output]\nroot = "{root}"\n'


def run_job_directly(job: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python jobs/JOB ARGS`` with a minimal config: enough for every check that runs before Spark."""
    config = tmp_path / "job.toml"
    if not config.exists():
        config.write_text(MINIMAL.format(root=tmp_path / "root"))
    return subprocess.run([sys.executable, f"jobs/{job}", "--config", str(config), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.mark.parametrize("job, args, code, message", [
    ("evaluate.py", ["--date", DAY, "--interactions", "/no/such/table"], 3, "--interactions /no/such/table does not exist"),
    ("evaluate.py", ["--date", DAY], 3, f"no run published for {DAY}"),
    ("train.py", ["--interactions", "/no/such/table", "--model-out", "m"], 3, "interactions /no/such/table does not exist"),
    ("recommend.py", ["--date", DAY, "--run-dir", "/no/such/run"], 3, "--run-dir /no/such/run does not exist"),
    ("recommend.py", ["--date", DAY, "--run-dir", "out", "--model", "/no/such/model", "--interactions", "."], 3,
     "--model /no/such/model does not exist"),
    ("recommend.py", ["--date", DAY, "--run-dir", "out", "--model", "."], 2, "error: --model needs --interactions"),
    ("nightly.py", ["--date", DAY, "--log-level", "CHATTY"], 2, "invalid choice: 'CHATTY'"),
    # the nightly refused a future date, the ingest job ran it (a window with no event yet)
    ("ingest.py", ["--date", "2052-11-28"], 2, "error: run date 2052-11-28 is in the future (today is "),
    ("recommend.py", ["--date", DAY, "--run-dir", "/x/runs/dt=2011-12-08/run_id=a"], 2,
     f"error: --date {DAY} but --run-dir is a run of 2011-12-08"),
    ("recommend.py", ["--run-dir", "/x/runs/dt=2011-12-08/run_id=a"], 3, "--run-dir /x/runs/dt=2011-12-08/run_id=a does not"),
    # its tables are swapped in with rename(2), which a URL cannot do: it failed after the scoring
    ("recommend.py", ["--run-dir", "hdfs:///r", "--model", ".", "--interactions", "."], 2,
     "--run-dir hdfs:///r: must be a local (POSIX) path"),
    ("recommend.py", ["--run-dir", "/etc/hostname/recs", "--model", ".", "--interactions", "."], 2,
     "--run-dir /etc/hostname/recs cannot be written: /etc/hostname is not a directory"),
    # saving replaced the directory: a mistyped --model-out deleted an output root with latest.json
    ("train.py", ["--interactions", ".", "--model-out", "conf"], 2,
     "--model-out conf exists and is not a saved model (no metadata/part-* naming a model class in it)"),
    # found only after every model had been trained: the whole evaluation was lost
    ("evaluate.py", ["--date", DAY, "--interactions", ".", "--out", "/etc/hostname/report"], 2,
     "report directory (--out) /etc/hostname/report cannot be written: /etc/hostname is not a directory"),
    ("train.py", ["--interactions", ".", "--model-out", "/etc/hostname/model"], 2,
     "--model-out /etc/hostname/model cannot be written: /etc/hostname is not a directory"),
])
def test_job_argument_mistakes_stop_before_spark(tmp_path, job, args, code, message):
    done = run_job_directly(job, *args, tmp_path=tmp_path)
    assert done.returncode == code, done.stderr[-3000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "Setting default log level" not in done.stderr  # Spark's start-up line: no session was built


@pytest.mark.parametrize("job, setting, message", [
    ("nightly.py", "input.path=/no/such/events", "input.path = /no/such/events does not exist"),
    ("ingest.py", "input.path=/no/such/events", "input.path = /no/such/events does not exist"),
    ("nightly.py", "recommend.allow_list_path=/no/such/list", "recommend.allow_list_path = /no/such/list does not"),
    ("nightly.py", "recommend.item_filter_path=/no/such/f", "recommend.item_filter_path = /no/such/f does not"),
])
def test_missing_local_inputs_of_the_config_stop_before_spark(tmp_path, job, setting, message):
    done = run_job_directly(job, "--date", DAY, "--set", setting, tmp_path=tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]
    assert message in done.stderr and f"(--set '{setting}')" in done.stderr  # named the file before
    assert "Setting default log level" not in done.stderr and not (tmp_path / "root").exists()


@pytest.mark.parametrize("job", ["nightly.py", "ingest.py"])
def test_a_held_root_stops_the_writing_jobs_before_spark(tmp_path, job):
    from mf_spark.errors import LockHeldError
    from mf_spark.publish import RunLock

    with RunLock(str(tmp_path / "root"), dt.date(2011, 12, 9)):  # held by this live process
        done = run_job_directly(job, "--date", DAY, "--break-stale-lock", tmp_path=tmp_path)
    assert done.returncode == LockHeldError.exit_code, done.stderr[-3000:]
    assert f"pid {os.getpid()}" in done.stderr and "still running" in done.stderr
    assert "Setting default log level" not in done.stderr


def test_recommend_into_a_run_of_a_held_root_stops_before_spark(tmp_path):
    """The recommend job rewrites a run's tables; a nightly's retention could delete that run meanwhile."""
    from mf_spark.errors import LockHeldError
    from mf_spark.publish import RunLock

    run_dir = tmp_path / "root" / "runs" / f"dt={DAY}" / "run_id=a"
    run_dir.mkdir(parents=True)
    with RunLock(str(tmp_path / "root"), dt.date(2011, 12, 9)):
        done = run_job_directly("recommend.py", "--run-dir", str(run_dir), "--break-stale-lock", tmp_path=tmp_path)
    assert done.returncode == LockHeldError.exit_code, done.stderr[-3000:]
    assert "locked by nightly run" in done.stderr and "Setting default log level" not in done.stderr


def test_a_corrupt_latest_json_stops_the_nightly_before_spark(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest.json").write_text("{not json")
    done = run_job_directly("nightly.py", "--date", DAY, tmp_path=tmp_path)
    assert done.returncode == 7, done.stderr[-3000:]
    assert "latest.json: not valid JSON" in done.stderr and "jobs/rollback.py --list" in done.stderr
    assert "Setting default log level" not in done.stderr


@pytest.mark.parametrize("job", ["nightly.py", "ingest.py"])
def test_an_output_root_that_cannot_be_created_stops_before_spark(tmp_path, job):
    """A file as output.root gave a NotADirectoryError traceback (exit 1); a root under a file failed
    after Spark had started."""
    (tmp_path / "afile").write_text("x")
    for root in (tmp_path / "afile", tmp_path / "afile" / "root"):
        done = run_job_directly(job, "--date", DAY, "--set", f"output.root={root}", tmp_path=tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"output.root = {root} (from --set 'output.root={root}') cannot be used: " in done.stderr
        assert f"{tmp_path / 'afile'} is not a directory" in done.stderr
        assert "Traceback" not in done.stderr and "Setting default log level" not in done.stderr


def test_log_level_is_case_insensitive(tmp_path):
    done = run_job_directly("evaluate.py", "--date", DAY, "--log-level", "debug", tmp_path=tmp_path)
    assert done.returncode == 3 and "invalid choice" not in done.stderr


def test_settings_checked_across_keys_name_the_config_file(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(MINIMAL.format(root=tmp_path / "root") + '[evaluate]\nks = [10]\n')
    done = run_job_directly("nightly.py", "--date", DAY, tmp_path=tmp_path)
    assert done.returncode == 2
    line = next(line for line in done.stderr.splitlines() if line.startswith("config error"))
    assert f"config error: {config}: key 'evaluate.gate.metric'" in line


def test_settings_checked_across_keys_name_the_set_that_caused_the_error(tmp_path):
    done = run_job_directly("nightly.py", "--date", DAY, "--set", "evaluate.ks=[10]", tmp_path=tmp_path)
    assert done.returncode == 2
    line = next(line for line in done.stderr.splitlines() if line.startswith("config error"))
    assert f"config error: {tmp_path / 'job.toml'} with --set evaluate.ks=[10]: key 'evaluate.gate.metric'" in line


def test_a_spark_session_that_cannot_start_names_the_setting_and_writes_nothing(tmp_path):
    """conf/cluster.toml run on a laptop: its hdfs:/// checkpoint dir failed SparkContext start-up with a
    Java traceback and exit 1."""
    done = run_job_directly("nightly.py", "--date", DAY, "--set", "spark.checkpoint.dir=hdfs:///tmp/ckpt",
                            tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("error:"))
    assert "Spark could not start with spark.checkpoint.dir = hdfs:///tmp/ckpt in" in line
    assert "--set spark.checkpoint.dir=hdfs:///tmp/ckpt" in line and "Incomplete HDFS URI" in line
    assert "Traceback" not in done.stderr and not (tmp_path / "root").exists()
    # the setting is applied after start-up: Spark's constructor no longer logs 60 lines of Java traces
    assert "ERROR" not in done.stderr and "\tat " not in done.stderr, done.stderr[-3000:]


def test_spark_submit_conf_beats_the_batch_defaults(tmp_path):
    """BATCH_DEFAULTS went through the session builder, which overrides what spark-submit was given:
    `--conf spark.python.worker.reuse=false` had no effect. Defaults now fill only what is unset."""
    job = tmp_path / "show_conf.py"
    job.write_text(
        "from mf_spark.session import build_session\n"
        "spark = build_session('conf-check')\n"
        "for key in ('spark.python.worker.reuse', 'spark.sql.sources.partitionOverwriteMode',\n"
        "            'spark.sql.session.timeZone'):\n"
        "    print('CONF', key, spark.conf.get(key))\n"
        "spark.stop()\n"
    )
    code, output = run_submit(["--master", "local[1]", "--conf", "spark.ui.enabled=false",
                               "--conf", "spark.python.worker.reuse=false",
                               "--conf", "spark.sql.sources.partitionOverwriteMode=static", str(job)],
                              tmp_path / "submit.log")
    assert code == 0, output[-3000:]
    shown = dict(line.split()[1:3] for line in output.splitlines() if line.startswith("CONF "))
    assert shown == {"spark.python.worker.reuse": "false", "spark.sql.sources.partitionOverwriteMode": "static",
                     "spark.sql.session.timeZone": "UTC"}  # the last: a default spark-submit left unset


def test_a_submitted_time_zone_other_than_utc_is_warned_about(tmp_path):
    """A site's spark-defaults.conf (or --conf) setting another session time zone silently moved event
    times without an offset, while docs/ingest.md promised UTC days."""
    job = tmp_path / "zone.py"
    job.write_text("from mf_spark.session import build_session\n"
                   "spark = build_session('zone-check')\n"
                   "print('ZONE', spark.conf.get('spark.sql.session.timeZone'))\n"
                   "spark.stop()\n")
    code, output = run_submit(["--master", "local[1]", "--conf", "spark.ui.enabled=false",
                               "--conf", "spark.sql.session.timeZone=America/New_York", str(job)],
                              tmp_path / "submit.log")
    assert code == 0, output[-3000:]
    assert "ZONE America/New_York" in output
    assert "spark.sql.session.timeZone is America/New_York, not UTC" in output


@pytest.mark.slow
def test_standalone_chain_ingest_train_recommend_evaluate(tmp_path):
    """The documented path without the nightly: the ingest job's table and id maps, the train job's saved
    model and the recommend job's --model/--interactions (train wrote userFactors/, recommend read only
    a run's user_factors/: the chain had no documented way through). Temporary checkpoint directories
    are removed when each job exits, and so are a configured checkpoint directory's files (Spark leaves its
    per-application sub-directory behind: a cluster's shared directory grew with every run)."""
    root, model = tmp_path / "root", tmp_path / "model"
    recs = root / "adhoc" / "recs"  # inside output.root: the recommend job holds the root's lock
    report = tmp_path / "report"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = base_env(TMPDIR=str(scratch))
    common = ["--master", "local[2]"]
    settings = ["--config", "conf/local.toml", "--set", f"output.root={root}", *SMALL_NIGHTLY]
    interactions = root / "ingest" / f"dt={DAY}" / "interactions"
    checkpoints = tmp_path / "checkpoints"
    steps = [
        ("ingest", [*common, "jobs/ingest.py", *settings, "--date", DAY,
                    "--set", f"spark.checkpoint.dir={checkpoints}"]),
        ("train", [*common, "jobs/train.py", *settings, "--interactions", str(interactions),
                   "--model-out", str(model)]),
        ("recommend", [*common, "jobs/recommend.py", *settings, "--date", DAY, "--model", str(model),
                       "--interactions", str(interactions), "--run-dir", str(recs)]),
        # the standalone evaluation in tuning mode: nothing else runs the job's body
        ("evaluate", [*common, "jobs/evaluate.py", *settings, "--date", DAY, "--interactions", str(interactions),
                      "--out", str(report), "--tune", "--set", "evaluate.ks=[10]",
                      "--set", 'evaluate.models=["implicit_als","popular"]', "--set", "evaluate.tuning.metric=ndcg@10",
                      "--set", "evaluate.gate.metric=ndcg@10",
                      "--set", "evaluate.tuning.rank=[4,8]", "--set", "evaluate.tuning.reg_param=[0.1]",
                      "--set", "evaluate.tuning.alpha=[10.0]"]),
    ]
    for name, args in steps:
        code, out = run_submit(args, tmp_path / f"{name}.log", env=env)
        assert code == 0, f"{name}:\n{out[-4000:]}"
        if name == "ingest":  # it printed the report but not where it wrote
            assert f"written: {interactions}, {interactions.parent / 'rejects'}" in out
            assert checkpoints.is_dir() and not list(checkpoints.iterdir())  # the ID maps were checkpointed
        if name == "recommend":
            assert f"took the lock {root / '_LOCK'}" in out and f"released the lock {root / '_LOCK'}" in out
        if name == "train":  # the saved model says how and from what it was trained
            assert re.search(rf"model saved to {re.escape(str(model))}: \d+ iterations in [\d.]+ s, final loss ", out)
            assert len(re.findall(r"ALS iteration \d+/\d+ loss=", out)) == int(
                re.search(r"(\d+) iterations in", out).group(1))
            metadata = json.loads(next((model / "metadata").glob("part-*")).read_text())
            assert metadata["provenance"]["interactions"] == str(interactions)
            assert "jobs/train.py" in metadata["provenance"]["argv"][0] and metadata["provenance"]["git_commit"]
            assert metadata["provenance"]["versions"]["pyspark"]  # the manifest's provenance, in its shape
            assert metadata["trainingParams"]["rank"] == 8
        if name == "evaluate":
            metrics = json.loads((report / "metrics.json").read_text())
            assert metrics["source"]["interactions"] == str(interactions) and metrics["source"]["run_date"] == DAY
            assert metrics["tuning"]["metric"] == "ndcg@10" and metrics["tuning"]["grid"]["rank"] == [4, 8]
            assert metrics["tuning"]["trials"] == {"implicit_als": 2}
            assert metrics["models"]["implicit_als"]["params"]["rank"] in (4, 8)
            assert metrics["ks"] == [10] and set(metrics["models"]) == {"implicit_als", "popular"}
            assert f"report: {report}/report.md" in out
            assert "the nightly's quality gate would pass its minimum: ndcg@10 = " in out

    table = read_table(recs / "recommendations")
    history = read_table(interactions)
    positive_users = history.loc[history["strength"] > 0, "user_idx"].nunique()
    assert table["user_id"].nunique() == positive_users
    assert table.groupby("user_id")["rank"].max().max() == 10  # recommend.top_n
    assert len(read_table(recs / "similar_items")) > 0
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("mf-spark-")]


@pytest.mark.parametrize("job", ["nightly.py", "ingest.py", "train.py", "recommend.py", "evaluate.py", "rollback.py"])
def test_help_keeps_the_example_command_lines(job):
    """The docstring examples are the help's point; argparse's default formatter ran them into one paragraph."""
    done = subprocess.run([sys.executable, f"jobs/{job}", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0
    examples = [line for line in done.stdout.splitlines() if line.lstrip().startswith(("./spark-submit.sh", ".venv/bin/python"))]
    assert examples and all(line.startswith("    ") for line in examples), done.stdout
    assert all(f"jobs/{job}" in line for line in examples)
    # Every line of the docstring as written, so a "\\" continuation is shown, not joined by Python.
    source = (REPO_ROOT / "jobs" / job).read_text().split('"""')[1].replace("\\\\", "\\")
    shown = done.stdout.splitlines()
    assert all(line in shown for line in source.splitlines() if line.strip()), done.stdout


def test_only_local_paths_are_checked_before_spark(tmp_path):
    """train_and_save refused every hdfs:// or s3a:// table as 'not found' (os.path.exists of a URI)."""
    from mf_spark.errors import InputDataError
    from mf_spark.pipeline import require_local_path

    for left_to_spark in ("hdfs://namenode/warehouse/interactions", "s3a://bucket/interactions", "", None):
        require_local_path(left_to_spark, "unused")
    require_local_path(str(tmp_path), "unused")
    with pytest.raises(InputDataError, match=r"^train: interactions not found: /no/such/table$"):
        require_local_path("/no/such/table", "train: interactions not found: /no/such/table")


def test_a_table_that_is_there_but_wrong_is_an_input_error_naming_it(spark, tmp_path):
    """An empty directory, files that are not Parquet, or a rejects table given as --interactions gave
    Spark's analysis traces (exit 1) from train, evaluate and recommend."""
    from mf_spark.config import load_config
    from mf_spark.errors import InputDataError
    from mf_spark.evaluate.holdout import evaluate_holdout
    from mf_spark.pipeline import train_and_save
    from mf_spark.tables import INTERACTION_COLUMNS, read_parquet_table

    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "text"
    text.mkdir()
    (text / "part-0.parquet").write_text("user_idx,item_idx,strength\n1,2,3.0\n")
    rejects = tmp_path / "rejects"
    spark.createDataFrame([("u0", "i1", "bad")], "user_id string, item_id string, reason string").write.parquet(
        str(rejects))
    for path, message in ((empty, "holds no Parquet files"), (text, "cannot be read as Parquet: "),
                          (rejects, "table has no column 'user_idx', 'item_idx', 'strength' "
                                    r"\(columns: user_id, item_id, reason\)")):
        with pytest.raises(InputDataError, match=f"^evaluate: interactions {path}: {message}"):
            read_parquet_table(spark, str(path), "evaluate: interactions", INTERACTION_COLUMNS)

    config = tmp_path / "job.toml"
    config.write_text(MINIMAL.format(root=tmp_path / "root"))
    train = load_config(config)["train"]
    with pytest.raises(InputDataError, match=r"^train: interactions .*rejects: table has no column 'user_idx'"):
        train_and_save(spark, train, str(rejects), str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()
    # the library call too: its first count failed with an analysis trace
    no_strength = spark.createDataFrame([(0, 1)], "user_idx int, item_idx int")
    with pytest.raises(InputDataError, match=r"^interactions: table has no column 'strength' \(columns: user_idx, item_idx\)"):
        evaluate_holdout(spark, no_strength, split="user_random", models=["popular"], train_params=train)


def test_checkpoint_dirs_of_killed_drivers_are_removed_when_the_next_job_starts(tmp_path, monkeypatch):
    """A SIGKILLed driver runs no atexit handler: every OOM-killed local job left its checkpoints in /tmp."""
    import subprocess
    import tempfile

    from mf_spark.publish import process_start_ticks
    from mf_spark.session import temporary_checkpoint_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    me, my_ticks = os.getpid(), process_start_ticks(os.getpid())
    names = {
        "dead": f"mf-spark-ckpt-{gone.pid}-{my_ticks}-x1",
        "reused_pid": f"mf-spark-ckpt-{me}-{my_ticks + 1}-x2",  # this pid, but another process's start
        "alive": f"mf-spark-ckpt-{me}-{my_ticks}-x3",
        "old_style": "mf-spark-ckpt-x4",
        "other_prefix": f"mf-spark-als-ckpt-{gone.pid}-{my_ticks}-x5",
    }
    for name in names.values():
        (tmp_path / name / "rdd-1").mkdir(parents=True)
    fresh = temporary_checkpoint_dir("mf-spark-ckpt-")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left and names["reused_pid"] not in left
    assert {names["alive"], names["old_style"], names["other_prefix"], os.path.basename(fresh)} <= left
    assert os.path.basename(fresh).startswith(f"mf-spark-ckpt-{me}-{my_ticks}-")


@pytest.mark.parametrize("text", ["2011-W49", "2011-W49-5", "2011W495", "20111209"])
def test_a_run_date_in_another_iso_form_is_refused(text):
    """date.fromisoformat took ISO week dates and the compact form: --date 2011-W49 ran 2011-12-05."""
    import argparse

    from mf_spark.cli import parse_date

    with pytest.raises(argparse.ArgumentTypeError, match="not a date in YYYY-MM-DD form"):
        parse_date(text)
    assert parse_date("2011-12-09") == __import__("datetime").date(2011, 12, 9)


def test_a_session_failure_message_keeps_credentials_out():
    """The error: line listed every --set spark.* override verbatim, credentials included."""
    from mf_spark.cli import session_failure_message

    cfg = {"_source": "job.toml", "spark": {"hadoop.fs.s3a.secret.key": "hunter2", "master": "spark://nohost:7077"}}
    message = session_failure_message(Exception("cannot reach spark://nohost:7077"), cfg,
                                      ["spark.hadoop.fs.s3a.secret.key=hunter2"])
    assert "hunter2" not in message
    assert "spark.master = spark://nohost:7077 in job.toml with --set spark.hadoop.fs.s3a.secret.key=<redacted>" in message
