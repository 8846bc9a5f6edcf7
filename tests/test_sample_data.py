"""The embedded sample event log: the Online Retail conversion and the data shipped in data/sample/events."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DateType,
    DoubleType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from mf_spark.errors import InputDataError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
EVENTS_DIR = SAMPLE_DIR / "events"
MAX_SAMPLE_BYTES = 15 * 1024 * 1024


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_online_retail", REPO_ROOT / "scripts" / "convert_online_retail.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


convert = _load_converter()

RAW_COLUMNS = [
    "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country",
]


def _raw(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


# Out of time order on purpose; strings as the CSV reader hands them over, one padded stock code.
HAND_ROWS = [
    ("C536379", "D", "Discount", "-1", "2010-12-01 09:41:00", "27.5", "14527.0", "United Kingdom"),
    ("536365", "85123A ", "HEART T-LIGHT", "6", "2010-12-01 08:26:00", "2.55", "17850.0", "United Kingdom"),
    ("536414", "22139", "", "56", "2010-12-01 11:52:00", "0.0", None, "United Kingdom"),
    ("536415", "POST", "POSTAGE", "1", "2010-12-01 11:57:00", "18.0", "", "France"),
    ("536365", "71053", "LANTERN", "6", "2010-12-01 08:26:00", "3.39", "17850.0", "United Kingdom"),
    ("536370", "POST", "POSTAGE", "3", "2010-12-01 08:45:00", "18.0", "12583.0", "France"),
]


def test_convert_frame_maps_hand_built_rows_to_events():
    events = convert.convert_frame(_raw(HAND_ROWS))

    expected = pd.DataFrame(
        {
            "user_id": ["17850", "17850", "12583", "14527"],
            "item_id": ["71053", "85123A", "POST", "D"],
            "event_type": ["purchase", "purchase", "purchase", "return"],
            "event_ts": pd.to_datetime(
                ["2010-12-01 08:26:00", "2010-12-01 08:26:00", "2010-12-01 08:45:00", "2010-12-01 09:41:00"]
            ).astype("datetime64[us]").tz_localize("UTC"),
            "value": [6.0, 6.0, 3.0, -1.0],
            "invoice_no": ["536365", "536365", "536370", "C536379"],
            "country": ["United Kingdom", "United Kingdom", "France", "United Kingdom"],
        }
    )
    pd.testing.assert_frame_equal(events, expected, check_dtype=True)


def test_convert_frame_keeps_wall_clock_time_as_utc_instant():
    # 2011-06-01 is British Summer Time; the wall-clock value must be stored unshifted.
    events = convert.convert_frame(
        _raw([("555000", "22423", "", "2", "2011-06-01 12:34:56", "1.0", "13047.0", "United Kingdom")])
    )
    ts = events.loc[0, "event_ts"]
    assert str(ts.tz) == "UTC"
    assert ts == pd.Timestamp("2011-06-01 12:34:56", tz="UTC")
    assert events["event_ts"].dtype == "datetime64[us, UTC]"


def test_convert_frame_accepts_float_customer_ids_and_drops_nulls():
    raw = _raw(
        [
            ("536365", "71053", "", "6", "2010-12-01 08:26:00", "3.39", 17850.0, "United Kingdom"),
            ("536366", "71053", "", "6", "2010-12-01 08:28:00", "3.39", float("nan"), "United Kingdom"),
        ]
    )
    events = convert.convert_frame(raw)
    assert events["user_id"].tolist() == ["17850"]


def test_convert_frame_names_missing_column():
    with pytest.raises(InputDataError, match="CustomerID"):
        convert.convert_frame(_raw(HAND_ROWS).drop(columns=["CustomerID"]))


def test_convert_frame_names_unparseable_date():
    raw = _raw([("536365", "71053", "", "6", "01/12/2010 08:26", "3.39", "17850.0", "United Kingdom")])
    with pytest.raises(InputDataError, match="InvoiceDate"):
        convert.convert_frame(raw)


def test_write_partitions_is_byte_deterministic(tmp_path):
    last_day_row = ("581587", "22613", "", "12", "2011-12-09 12:50:00", "0.85", "12680.0", "France")
    events = convert.convert_frame(_raw(HAND_ROWS + [last_day_row]))
    first, second = tmp_path / "a", tmp_path / "b"
    convert.write_partitions(events, first)
    reshuffled = events.sample(frac=1.0, random_state=3).sort_values(convert.SORT_KEYS, kind="mergesort")
    convert.write_partitions(reshuffled, second)

    files = sorted(p.relative_to(first) for p in first.rglob("*.parquet"))
    assert [str(p) for p in files] == [
        "event_date=2010-12-01/part-00000.zstd.parquet",
        "event_date=2011-12-09/part-00000.zstd.parquet",
    ]
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    assert "event_date" not in pq.read_schema(first / files[0]).names


def _readme_rows_written() -> int:
    text = (SAMPLE_DIR / "README.md").read_text()
    match = re.search(r"rows written\D*?([\d,]+)", text, flags=re.IGNORECASE)
    assert match, "data/sample/README.md must state 'rows written'"
    return int(match.group(1).replace(",", ""))


def test_shipped_sample_reads_in_spark_with_event_schema(spark):
    events = spark.read.parquet(str(EVENTS_DIR))

    expected = StructType(
        [
            StructField("user_id", StringType()),
            StructField("item_id", StringType()),
            StructField("event_type", StringType()),
            StructField("event_ts", TimestampType()),
            StructField("value", DoubleType()),
            StructField("invoice_no", StringType()),
            StructField("country", StringType()),
            StructField("event_date", DateType()),
        ]
    )
    actual_types = [(f.name, f.dataType) for f in events.schema.fields]
    assert actual_types == [(f.name, f.dataType) for f in expected.fields]

    stats = events.agg(
        F.count("*").alias("rows"),
        F.sum(F.col("user_id").isNull().cast("int")).alias("null_users"),
        F.sum(F.col("item_id").isNull().cast("int")).alias("null_items"),
        F.sum((F.to_date("event_ts") != F.col("event_date")).cast("int")).alias("date_mismatches"),
        F.min("event_date").alias("first_day"),
        F.max("event_date").alias("last_day"),
        F.sort_array(F.collect_set("event_type")).alias("event_types"),
    ).first()
    assert stats["rows"] == _readme_rows_written()
    assert stats["null_users"] == 0
    assert stats["null_items"] == 0
    assert stats["date_mismatches"] == 0
    assert str(stats["first_day"]) == "2010-12-01"
    assert str(stats["last_day"]) == "2011-12-09"
    assert stats["event_types"] == ["purchase", "return"]

    # The first invoice line of the log, as wall-clock text under the UTC session time zone.
    first = (
        events.where((F.col("invoice_no") == "536365") & (F.col("item_id") == "85123A"))
        .select(F.date_format("event_ts", "yyyy-MM-dd HH:mm:ss").alias("ts"), "user_id", "value")
        .first()
    )
    assert (first["ts"], first["user_id"], first["value"]) == ("2010-12-01 08:26:00", "17850", 6.0)


def test_shipped_sample_fits_size_budget():
    files = [p for p in SAMPLE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_SAMPLE_BYTES
    partitions = sorted(p.name for p in EVENTS_DIR.iterdir())
    assert all(re.fullmatch(r"event_date=\d{4}-\d\d-\d\d", name) for name in partitions)
    for name in partitions:
        assert [x.name for x in (EVENTS_DIR / name).iterdir()] == [convert.PART_FILE_NAME], name


@pytest.mark.data
def test_rerun_on_two_source_days_matches_shipped_partitions(shared_data, tmp_path):
    source = shared_data / "online-retail" / "by-day"
    days = ["2010-12-01", "2011-12-09"]
    summary = convert.convert_directory(source, tmp_path, days=days)

    assert summary.days == 2
    for day in days:
        rel = Path(f"event_date={day}") / convert.PART_FILE_NAME
        rebuilt = pq.read_table(tmp_path / rel)
        shipped = pq.read_table(EVENTS_DIR / rel)
        assert rebuilt.num_rows > 0
        assert rebuilt.equals(shipped, check_metadata=True), day
