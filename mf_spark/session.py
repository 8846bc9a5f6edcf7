"""The one place a SparkSession is built."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping

from pyspark.sql import SparkSession

from mf_spark.errors import ConfigError

log = logging.getLogger(__name__)

#: Session time zones that are UTC under another name (no warning for them).
UTC_NAMES = frozenset(name.upper() for name in (
    "UTC", "Etc/UTC", "UCT", "Etc/UCT", "Universal", "Etc/Universal", "Zulu", "Etc/Zulu", "Z", "GMT", "Etc/GMT",
    "GMT0", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0", "GMT+0", "GMT-0", "UT", "UTC+0", "Greenwich", "Etc/Greenwich",
    "+00:00", "-00:00", "+00", "UTC+00:00"))

# Batch defaults a nightly job wants whatever the cluster: UTC so event dates do not shift with the
# machine, no console progress bar in logs, and one BLAS thread per Python worker so numpy block
# kernels do not oversubscribe the executor's cores.
BATCH_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
    "spark.executorEnv.OMP_NUM_THREADS": "1",
    "spark.executorEnv.MKL_NUM_THREADS": "1",
    "spark.python.worker.reuse": "true",
    # The evaluation's per-user metric table has one column per metric and K (28 by default); with
    # Spark's limit of 25 fields every nightly printed a WARN that a plan string was truncated.
    "spark.sql.debug.maxToStringFields": "100",
    # Delete a checkpoint's files once its RDD is garbage collected on the driver. Otherwise they stayed
    # until the job ended: every ALS fit, k-core pass and ID-map checkpoint of a backfill or a tuning run
    # piled up in spark.checkpoint.dir (on a cluster's shared directory, gigabytes per fit).
    "spark.cleaner.referenceTracking.cleanCheckpoints": "true",
}


def build_session(
    app_name: str,
    properties: Mapping[str, str] | None = None,
    master: str | None = None,
    checkpoint_dir: str | None = None,
    log_level: str = "WARN",
) -> SparkSession:
    """Build (or get) the SparkSession with the project's batch defaults.

    Parameters
    ----------
    app_name : str
        Application name shown by the cluster manager.
    properties : mapping, optional
        Spark properties with their full names; they override :data:`BATCH_DEFAULTS`.
    master : str, optional
        Only for tests and local tools; jobs get their master from ``spark-submit``.
    checkpoint_dir : str, optional
        Checkpoint directory. When neither this nor ``spark.checkpoint.dir`` is given, a fresh
        temporary directory is used in local mode, so ALS checkpointing is never silently off (MLlib's
        trap); any other master needs a shared directory.
    log_level : str
        JVM log level after start-up.

    Raises
    ------
    ConfigError
        When no checkpoint directory is given and the master is not local (the session is stopped).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Python workers must have numpy/pyarrow: default them to this interpreter. Clusters whose
    # executors run another Python set PYSPARK_PYTHON (e.g. ./environment/bin/python of a packed venv).
    if "PYSPARK_PYTHON" not in os.environ and not (properties or {}).get("spark.pyspark.python"):
        os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    # A builder option overrides what spark-submit was given, so a default set here silently beat
    # `--conf spark.python.worker.reuse=false`: defaults only fill what spark-submit left unset.
    submitted = _submitted_properties()
    defaults = {name: value for name, value in BATCH_DEFAULTS.items() if name not in submitted}
    merged = {**defaults, **(properties or {})}
    for name, value in merged.items():
        # Set below instead: a directory Spark cannot use (hdfs:/// without HDFS, the usual mistake)
        # failed the SparkContext constructor, which logged 60 lines of Java traces before the job's
        # one-line error.
        if name != "spark.checkpoint.dir":
            builder = builder.config(name, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    zone = spark.conf.get("spark.sql.session.timeZone")
    if zone.upper() not in UTC_NAMES:
        # A site's spark-defaults.conf or a --conf wins over the default above; say what that changes.
        log.warning("spark.sql.session.timeZone is %s, not UTC: event times without an offset and "
                    "timestamp_ntz/date columns are read as %s times, so events near midnight can move "
                    "to another day's window (set spark.sql.session.timeZone=UTC to keep the days UTC)",
                    zone, zone)
    checkpoint_dir = checkpoint_dir or merged.get("spark.checkpoint.dir")
    sc = spark.sparkContext
    if not sc.getCheckpointDir():
        if not checkpoint_dir and not sc.master.startswith("local"):
            # A temporary directory is on the driver's disk: executors on other hosts would checkpoint to
            # their own disks and the driver would not find the files (the ID maps and ALS need them).
            master = sc.master
            spark.stop()
            raise ConfigError(f"spark.checkpoint.dir is not set and the master {master} is not local: set it "
                              "to a directory every node shares (HDFS, S3, NFS), as conf/cluster.toml does")
        try:
            sc.setCheckpointDir(checkpoint_dir or temporary_checkpoint_dir("mf-spark-ckpt-"))
        except Exception:
            spark.stop()
            raise
    return spark


def _submitted_properties() -> set[str]:
    """Names of the Spark properties spark-submit was given (``--conf``, ``spark-defaults.conf``): the
    driver JVM holds them as ``spark.*`` system properties before any context starts."""
    from pyspark import SparkContext

    SparkContext._ensure_initialized()
    properties = SparkContext._jvm.java.lang.System.getProperties()
    return {str(name) for name in properties.stringPropertyNames() if str(name).startswith("spark.")}


def spark_context_stopped(spark: SparkSession) -> bool:
    """Whether the driver JVM's SparkContext stopped under this Python driver.

    spark-submit runs the Python driver as a child of the JVM: SIGTERM to spark-submit (a scheduler's
    timeout, ``yarn application -kill`` of a client-mode job) stops the context from a JVM shutdown hook,
    and Python only sees its next call fail with an unrelated-looking Py4J error.
    """
    try:
        jsc = spark.sparkContext._jsc
        return jsc is None or bool(jsc.sc().isStopped())
    except Exception:  # noqa: BLE001 - the JVM itself is gone
        return True


def stop_session(spark: SparkSession) -> None:
    """Delete this application's checkpoint files, then stop the session.

    Spark checkpoints into a fresh sub-directory of ``spark.checkpoint.dir`` per application and never
    deletes it: on a cluster's shared directory every nightly left its ID-map, k-core and ALS factor
    checkpoints behind. They are of no use once the driver ends. A failure to delete is logged, not
    raised: the job's outcome is already decided.
    """
    try:
        sc = spark.sparkContext
        directory = sc.getCheckpointDir()
        if directory:
            path = sc._jvm.org.apache.hadoop.fs.Path(directory)
            path.getFileSystem(sc._jsc.hadoopConfiguration()).delete(path, True)
    except Exception as exc:  # noqa: BLE001 - clean-up must not turn a finished job into a failure
        log.warning("could not delete the checkpoint files of this run: %s", exc)
    finally:
        spark.stop()


def temporary_checkpoint_dir(prefix: str) -> str:
    """A fresh local directory for checkpoints, deleted when the Python process exits.

    Checkpoints are only needed while the driver lives; without the clean-up every job run left one
    directory (with every checkpointed factor RDD) in /tmp. A SIGKILLed driver (the OOM killer) runs no
    exit handler, so the name carries the pid and its start time, and the directories of dead drivers
    are removed here, when the next job starts.
    """
    from mf_spark.publish import process_start_ticks

    pid = os.getpid()
    remove_dead_checkpoint_dirs(tempfile.gettempdir(), prefix)
    path = tempfile.mkdtemp(prefix=f"{prefix}{pid}-{process_start_ticks(pid) or 0}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remove_dead_checkpoint_dirs(parent: str, prefix: str) -> list[str]:
    """Remove the ``prefix<pid>-<start ticks>-*`` directories under ``parent`` whose process is gone;
    the names removed. Directories named otherwise (older versions, other tools) are left alone."""
    from mf_spark.publish import pid_alive

    pattern = re.compile(re.escape(prefix) + r"(\d+)-(\d+)-")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if not pid_alive(pid, ticks or None):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d checkpoint director%s left by killed jobs in %s", len(removed),
                 "y" if len(removed) == 1 else "ies", parent)
    return removed
