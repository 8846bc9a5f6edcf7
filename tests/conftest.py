"""Shared fixtures: one session-scoped local[2] SparkSession for the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from mf_spark.session import build_session

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    session = build_session(
        "mf-spark-tests",
        {
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.sql.session.timeZone": "UTC",
            "spark.local.dir": str(tmp_path_factory.mktemp("spark-local")),
            "spark.driver.memory": "2g",
            # as conf/local.toml: list local partition directories on the driver, not as a Spark job
            "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
        },
        master="local[2]",
        checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")),
        log_level="ERROR",
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
