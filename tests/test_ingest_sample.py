"""The embedded Online Retail sample ingests with its quirks handled, checked against pandas; and the
standalone job runs end to end."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from mf_spark.config import validate
from mf_spark.ingest import IngestSettings, run_ingest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample" / "events"
RUN_DATE = dt.date(2011, 12, 9)
LOOKBACK = 5


def default_settings(**overrides) -> IngestSettings:
    cfg = validate({"input": {"path": str(SAMPLE)}, "output": {"root": "unused"}, "ingest": overrides})
    return IngestSettings.from_config(cfg["ingest"])


def pandas_reference(start: dt.date, end: dt.date) -> pd.DataFrame:
    """The window's events read by pyarrow and aggregated the documented way with the default rules."""
    table = ds.dataset(SAMPLE, format="parquet", partitioning="hive").to_table(
        filter=(ds.field("event_date") >= start.isoformat()) & (ds.field("event_date") <= end.isoformat())
    )
    return table.to_pandas()[["user_id", "item_id", "event_type", "event_ts", "value"]]


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="embedded sample not built")
def test_sample_ingests_like_the_pandas_reference(spark, tmp_path):
    result = run_ingest(
        spark,
        input_path=str(SAMPLE),
        input_format="parquet",
        columns=validate({"input": {"path": "x"}, "output": {"root": "y"}})["input"]["columns"],
        reader_options={},
        settings=default_settings(lookback_days=LOOKBACK),
        run_date=RUN_DATE,
        id_map_root=str(tmp_path / "id_maps"),
        run_id="sample",
    )
    report = result.report
    events = pandas_reference(RUN_DATE - dt.timedelta(days=LOOKBACK - 1), RUN_DATE)
    unique = events.drop_duplicates()
    assert report["partition_pruned"] is True
    assert report["rows_read"] == len(events)
    assert report["deduplicated"] == len(events) - len(unique) > 0  # the sample repeats invoice lines
    # returns carry negative quantities: absolute_value keeps them valid
    assert (unique["event_type"] == "return").sum() > 0 and report["rejected"] == 0
    assert report["accepted_events"] == len(unique)

    weight = unique["event_type"].map({"purchase": 1.0, "return": -1.0})
    unique = unique.assign(strength=weight * unique["value"].abs().clip(upper=50.0))
    expected = unique.groupby(["user_id", "item_id"], as_index=False).agg(
        strength=("strength", "sum"), n_events=("strength", "size")
    )
    actual = (
        result.interactions.join(result.dim_user, "user_idx")
        .join(result.dim_item, "item_idx")
        .select("user_id", "item_id", "strength", "n_events")
        .toPandas()
    )
    merged = expected.merge(actual, on=["user_id", "item_id"], how="outer", suffixes=("_pd", "_spark"))
    assert len(merged) == len(expected) == len(actual) == report["interactions"]
    np.testing.assert_allclose(merged["strength_spark"], merged["strength_pd"], rtol=1e-6)
    assert (merged["n_events_spark"] == merged["n_events_pd"]).all()
    assert (merged["strength_spark"] < 0).any()  # some customers returned more than they bought here
    result.unpersist()


def test_standalone_job_writes_outputs_and_prints_the_report(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = tmp_path / "events"
    events.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u1", None],
                "item_id": ["a", "b", "a"],
                "event_type": ["purchase"] * 3,
                "event_ts": ["2024-03-10 08:00:00"] * 3,
                "value": [2.0, 1.0, 1.0],
            }
        ),
        events / "part-0.parquet",
    )
    config = tmp_path / "job.toml"
    config.write_text(
        f'[input]\npath = "{events}"\n[output]\nroot = "{tmp_path / "out"}"\n'
        '[spark]\nmaster = "local[1]"\n"ui.enabled" = false\n"sql.shuffle.partitions" = 2\n'
        "[ingest]\nlookback_days = 3\nmax_reject_fraction = 0.5\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "jobs" / "ingest.py"),
            "--config",
            str(config),
            "--date",
            "2024-03-10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        # C1 only, as tests/cluster.py base_env: a short-lived driver JVM spends more on C2 than it saves
        env={"SPARK_LOCAL_IP": "127.0.0.1", "PATH": "/usr/bin:/bin", "SPARK_SUBMIT_OPTS": "-XX:TieredStopAtLevel=1",
             **_java_env()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest report" in proc.stdout and "null_user_id" in proc.stdout
    out = tmp_path / "out" / "ingest" / "dt=2024-03-10"
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_read"], report["accepted_events"], report["rejected"]) == (3, 2, 1)
    interactions = pq.read_table(out / "interactions").to_pandas()
    assert interactions[["user_idx", "item_idx", "strength"]].values.tolist() == [[0, 0, 2.0], [0, 1, 1.0]]
    assert pq.read_table(out / "rejects").column("reason").to_pylist() == ["null_user_id"]
    assert (tmp_path / "out" / "id_maps" / "CURRENT.json").is_file()


def _java_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("JAVA_HOME", "HOME", "TMPDIR", "LANG")}
