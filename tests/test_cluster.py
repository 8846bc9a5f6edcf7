"""./spark-submit.sh and the nightly on a real standalone cluster (one master, two one-core workers).

The cluster is started from the pip-installed PySpark with sbin/spark-daemon.sh on 127.0.0.1 and
stopped by pid when the module ends, whatever happened (tests/cluster.py). The nightly submitted to
the cluster loses a worker (SIGKILL) while ALS trains, and its outputs are compared with a local[2] run
of the same date.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from cluster import (
    DAY,
    REPO_ROOT,
    assert_same_factors,
    assert_same_top_n,
    base_env,
    copy_root,
    ensure_baseline,
    latest_run_dir,
    manifest,
    nightly_args,
    run_submit,
    standalone_cluster,
    submit,
)

PROBE_JOB = textwrap.dedent(
    """
    # Reports where the driver and the executors found Python and mf_spark, then exits with argv[1].
    import json, sys
    from pyspark.sql import SparkSession
    from mf_spark.publish import git_commit

    def where(_):
        import sys, mf_spark
        yield sys.executable, mf_spark.__file__

    spark = SparkSession.builder.getOrCreate()
    executors = spark.sparkContext.parallelize(range(2), 2).mapPartitions(where).collect()
    print("PROBE " + json.dumps({"git_commit": git_commit(), "executors": executors, "argv": sys.argv[1:],
                                 "tz": spark.conf.get("spark.sql.session.timeZone")}))
    spark.stop()
    sys.exit(int(sys.argv[1]))
    """
)


def probe_result(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.fixture(scope="module")
def probe_job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE_JOB)
    return path


# --------------------------------------------------------------------------------------------------
# spark-submit.sh itself (local mode, no cluster)


def test_spark_submit_sh_ships_a_zip_and_passes_the_exit_code(probe_job, tmp_path):
    code, out = run_submit(["--master", "local[1]", "--conf", "spark.ui.enabled=false", str(probe_job), "3",
                            "--flag", "two words"], tmp_path / "probe.log")
    assert code == 3, out[-3000:]
    assert f"SPARK_CONF_DIR={REPO_ROOT / 'conf'}" in out
    shipped = re.search(r"--py-files (\S+)", out).group(1)
    assert re.fullmatch(rf"{REPO_ROOT / 'dist'}/mf_spark-[0-9a-f]{{12}}\.zip", shipped), shipped
    # content-addressed, and the same bytes as the stable dist/mf_spark.zip
    assert hashlib.sha256(Path(shipped).read_bytes()).hexdigest()[:12] in shipped
    assert Path(shipped).read_bytes() == (REPO_ROOT / "dist" / "mf_spark.zip").read_bytes()
    result = probe_result(out)
    assert result["argv"] == ["3", "--flag", "two words"]
    assert result["tz"] == "UTC"  # from conf/spark-defaults.conf
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert result["git_commit"].startswith(head)
    assert " INFO " not in out  # conf/log4j2.properties: Spark at WARN
    with zipfile.ZipFile(REPO_ROOT / "dist" / "mf_spark.zip") as zf:
        names = set(zf.namelist())
    assert {"mf_spark/__init__.py", "mf_spark/publish.py", "mf_spark/_build_info.json"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_zip_is_reproducible():
    build = lambda: subprocess.run(["./spark-submit.sh", "--zip-only"], cwd=REPO_ROOT, env=base_env(),  # noqa: E731
                                   capture_output=True, text=True, timeout=60, check=True)
    assert build().stdout.strip() == str(REPO_ROOT / "dist" / "mf_spark.zip")
    first = (REPO_ROOT / "dist" / "mf_spark.zip").read_bytes()
    # A fresh clone has other modification times, and a build a second later another clock: neither may
    # change the bytes (two builds in a row alone would pass with mtimes or the build time in the zip).
    touched = REPO_ROOT / "mf_spark" / "errors.py"
    stat = touched.stat()
    try:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 86_400 * 10**9))
        build()
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (REPO_ROOT / "dist" / "mf_spark.zip").read_bytes() == first
    with zipfile.ZipFile(REPO_ROOT / "dist" / "mf_spark.zip") as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_spark_submit_sh_explains_a_missing_spark_submit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "git", "dirname", "sed", "mkdir", "mv", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {**base_env(), "PATH": str(bin_dir)}
    done = subprocess.run(["/bin/bash", "./spark-submit.sh", "jobs/nightly.py", "--config", "conf/local.toml"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 127
    assert "spark-submit not found on PATH" in done.stderr and ".venv/bin" in done.stderr


def test_spark_submit_sh_rejects_a_missing_job_file():
    done = subprocess.run(["./spark-submit.sh", "--master", "local[1]"], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no job file given" in done.stderr
    done = subprocess.run(["./spark-submit.sh", "jobs/no_such_job.py"], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "job file not found: jobs/no_such_job.py" in done.stderr


# --------------------------------------------------------------------------------------------------
# on a standalone cluster


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    with standalone_cluster(tmp_path_factory.mktemp("standalone")) as running:
        yield running


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return ensure_baseline(tmp_path_factory.getbasetemp() / "nightly-baseline")


def executors_launched(cluster) -> dict[int, int]:
    return {w.instance: w.log_text().count("Asked to launch executor") for w in cluster.workers}


@pytest.mark.slow
@pytest.mark.cluster
def test_packed_venv_reaches_the_executors(spark_cluster, probe_job, tmp_path):
    """MF_SPARK_VENV_ARCHIVE: executors run ./environment/bin/python and import mf_spark from the zip.

    The archive is a venv whose only packages come from a .pth line naming this venv's site-packages
    (packing a full venv with venv-pack works the same way and takes minutes); it has no editable
    install of mf_spark, so the executors can only find mf_spark in dist/mf_spark.zip.
    """
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    our_site = next((Path(sys.executable).parent.parent / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(f"{our_site}\n")
    archive = tmp_path / "env.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(env_dir, arcname=".")
    env = base_env(MF_SPARK_VENV_ARCHIVE=str(archive))
    env.pop("PYSPARK_PYTHON")
    code, out = run_submit(["--master", spark_cluster.url, str(probe_job), "0"], tmp_path / "probe.log", env=env)
    assert code == 0, out[-4000:]
    assert f"--archives {archive}#environment" in out
    executors = probe_result(out)["executors"]
    assert len(executors) == 2
    for executable, module_file in executors:
        assert executable.endswith("/environment/bin/python"), executable
        assert re.search(r"mf_spark-[0-9a-f]{12}\.zip/mf_spark/__init__.py$", module_file), module_file


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_session_without_a_shared_checkpoint_dir_is_refused(spark_cluster, tmp_path):
    """A temporary checkpoint directory is on the driver's disk; on a cluster of several hosts the executors
    would write the ID maps' and ALS's checkpoints to their own disks and the driver would not find them."""
    root = tmp_path / "root"
    code, out = run_submit(["--master", spark_cluster.url, "jobs/nightly.py", "--config", "conf/local.toml",
                            "--set", f"output.root={root}", "--date", DAY], tmp_path / "run.log")
    assert code == 2, out[-4000:]
    assert f"spark.checkpoint.dir is not set and the master {spark_cluster.url} is not local" in out
    assert "Traceback" not in out and not root.exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_nightly_on_the_cluster_survives_a_lost_worker_and_matches_local(spark_cluster, baseline, tmp_path):
    """The nightly submitted to the cluster runs executors on both workers; one worker (and its executor)
    is SIGKILLed while ALS iterates; the job finishes on the other worker with the same tables as the
    local[2] run of the same date.

    One submission checks both the cluster run and the lost worker: a cluster nightly costs a minute and
    a half of the suite, and an undisturbed run could only differ from this one by passing more easily.
    Runs last in this module: it leaves one worker.
    """
    root = copy_root(baseline, tmp_path / "root")
    local_run = latest_run_dir(root)
    launched_before = executors_launched(spark_cluster)
    running = submit(nightly_args(root, master=spark_cluster.url,
                                  spark_options=["--conf", "spark.executor.memory=768m"]), tmp_path / "cluster.log")
    try:
        deadline = time.monotonic() + 600
        while "ALS blocks built" not in running.output:
            assert running.process.poll() is None, running.output[-4000:] + spark_cluster.logs()
            assert time.monotonic() < deadline, running.output[-4000:]
            time.sleep(0.1)
        launched = executors_launched(spark_cluster)
        victim = spark_cluster.workers[0]
        spark_cluster.kill_worker(victim)
        log_at_kill = running.output
        code = running.wait(600)
    finally:
        running.kill()
    out = running.output
    assert code == 0, out[-5000:] + spark_cluster.logs()
    assert "--conf spark.executor.memory=768m jobs/nightly.py" in out
    # both workers ran executors of this application before one was lost
    assert all(launched[i] > launched_before[i] for i in launched), spark_cluster.logs()
    assert "ALS fit:" not in log_at_kill, "the worker was killed after training had finished"
    assert "Lost executor" in out, out[-5000:]
    cluster_run = latest_run_dir(root)
    assert cluster_run != local_run and manifest(cluster_run)["run"]["run_date"] == DAY
    assert os.path.exists(cluster_run / "_PUBLISHED")
    assert_same_factors(local_run, cluster_run)
    assert_same_top_n(local_run, cluster_run)
    # the shared checkpoint directory (see nightly_args) keeps nothing of the finished run
    assert not list((root.parent / (root.name + "-checkpoints")).iterdir())
