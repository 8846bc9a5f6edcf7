"""run_ingest end to end on tiny hand-built event files: every reject reason, the conservation identity,
dedup, bots, support filters, the reject threshold, the window and determinism; the standalone ingest job
(run_ingest_job, jobs/ingest.py) and the output-root lock it holds."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from mf_spark.errors import InputDataError, RejectThresholdError
from mf_spark.ingest import EventTypeRule, IngestSettings, format_report_table, read_pointer, run_ingest
from mf_spark.ingest.report import ConservationError, check_conservation

RUN_DATE = dt.date(2024, 3, 10)
COLUMNS = {
    "user_id": "user_id",
    "item_id": "item_id",
    "event_type": "event_type",
    "event_ts": "event_ts",
    "value": "value",
}
RULES = {
    "view": EventTypeRule(weight=1.0),
    "purchase": EventTypeRule(weight=4.0, use_value=True, value_cap=10.0),
    "return": EventTypeRule(weight=-2.0, use_value=True, absolute_value=True),
}
RAW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("event_ts", pa.string()),
        ("value", pa.string()),
    ]
)


def settings(**overrides) -> IngestSettings:
    base = dict(lookback_days=10, max_id_length=8, max_reject_fraction=1.0, event_types=RULES)
    base.update(overrides)
    return IngestSettings(**base)


def write_parquet(path: Path, rows: list[tuple], schema: pa.Schema = RAW_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema), path)
    return path


def ingest(
    spark, path: Path, tmp_path: Path, *, fmt="parquet", options=None, run_id="r1", id_maps="id_maps", **kw
):
    return run_ingest(
        spark,
        input_path=str(path),
        input_format=fmt,
        columns=COLUMNS,
        reader_options=options or {},
        settings=kw.pop("rules", None) or settings(**kw),
        run_date=RUN_DATE,
        id_map_root=str(tmp_path / id_maps),
        run_id=run_id,
    )


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def strings(df):
    """Rejects with the source file reduced to its name (Spark gives a file: URI)."""
    return df.withColumn("source_file", F.regexp_extract("source_file", r"([^/]+)$", 1))


INTERACTION_SCHEMA = (
    "user_idx int, item_idx int, strength float, n_events long, first_ts timestamp, last_ts timestamp"
)
REJECT_SCHEMA = (
    "user_id string, item_id string, event_type string, event_ts string, value string, "
    "reason string, source_file string"
)

# Every row-level reject reason once, valid events, an exact duplicate, and a bot (limit 3 a day).
ALL_REASONS = [
    ("u1", "i1", "view", "2024-03-10 10:00:00", None),
    ("u1", "i1", "view", "2024-03-10T10:00:00Z", None),  # the same instant written differently: duplicate
    ("u1", "i2", "purchase", "2024-03-09 12:00:00", "3"),  # 4 * 3
    ("u2", "i1", "purchase", "2024-03-05 00:00:00", "20"),  # 4 * cap 10
    ("u2", "i1", "return", "2024-03-06 00:00:00", "-5"),  # -2 * |-5|
    ("u2", "i2", "return", "1709683200", "1"),  # epoch seconds of 2024-03-06 00:00: -2
    (None, "i1", "view", "2024-03-10 10:00:00", None),
    ("", "i1", "view", "2024-03-10 10:00:00", None),
    ("u3", None, "view", "2024-03-10 10:00:00", None),
    ("u3", "  ", "view", "2024-03-10 10:00:00", None),
    ("u23456789", "i1", "view", "2024-03-10 10:00:00", None),
    ("u3", "i1", "click", "2024-03-10 10:00:00", None),
    ("u3", "i1", "view", None, None),
    ("u3", "i1", "view", "not a time", None),
    ("u3", "i1", "purchase", "2024-03-10 10:00:00", "-1"),
    ("u3", "i1", "purchase", "2024-03-10 10:00:00", "NaN"),
    ("u3", "i1", "view", "2024-03-11 00:00:00", None),
    ("u3", "i1", "view", "2024-02-29 23:59:59", None),
    *[("bot", f"i{k}", "view", f"2024-03-08 0{k}:00:00", None) for k in range(4)],
    ("bot", "i0", "view", "2024-03-08 00:00:00", None),  # a bot's duplicate is a bot_user reject too
    ("bot", "i9", "view", "2024-03-09 00:00:00", None),  # a bot's other day is rejected as well
    ("bot", "i1", "view", "yesterday", None),  # a row with its own reason keeps it
]


def test_every_reject_reason_conservation_and_interactions(spark, tmp_path):
    path = write_parquet(tmp_path / "events" / "part-0.parquet", ALL_REASONS)
    result = ingest(spark, path.parent, tmp_path, max_events_per_user_day=3)
    report = result.report

    expected_rejects = spark.createDataFrame(
        [
            (None, "i1", "view", "2024-03-10 10:00:00", None, "null_user_id"),
            ("", "i1", "view", "2024-03-10 10:00:00", None, "empty_user_id"),
            ("u3", None, "view", "2024-03-10 10:00:00", None, "null_item_id"),
            ("u3", "  ", "view", "2024-03-10 10:00:00", None, "empty_item_id"),
            ("u23456789", "i1", "view", "2024-03-10 10:00:00", None, "user_id_too_long"),
            ("u3", "i1", "click", "2024-03-10 10:00:00", None, "unknown_event_type"),
            ("u3", "i1", "view", None, None, "null_timestamp"),
            ("u3", "i1", "view", "not a time", None, "unparseable_timestamp"),
            ("u3", "i1", "purchase", "2024-03-10 10:00:00", "-1", "invalid_value"),
            ("u3", "i1", "purchase", "2024-03-10 10:00:00", "NaN", "invalid_value"),
            ("u3", "i1", "view", "2024-03-11 00:00:00", None, "future_timestamp"),
            ("u3", "i1", "view", "2024-02-29 23:59:59", None, "outside_window"),
            ("bot", "i1", "view", "yesterday", None, "unparseable_timestamp"),
            *[("bot", f"i{k}", "view", f"2024-03-08 0{k}:00:00", None, "bot_user") for k in range(4)],
            ("bot", "i0", "view", "2024-03-08 00:00:00", None, "bot_user"),
            ("bot", "i9", "view", "2024-03-09 00:00:00", None, "bot_user"),
        ],
        "user_id string, item_id string, event_type string, event_ts string, value string, reason string",
    ).withColumn("source_file", F.lit("part-0.parquet"))
    assert_df_equality(strings(result.rejects), expected_rejects, ignore_row_order=True, ignore_nullable=True)

    assert report["rows_read"] == len(ALL_REASONS) == 25
    assert report["deduplicated"] == 1
    assert report["accepted_events"] == 5
    assert report["rejected"] == 19
    assert report["accepted_events"] + report["rejected"] + report["deduplicated"] == report["rows_read"]
    assert report["newest_event"].startswith("2024-03-10 ")  # the run date has events: no warning
    assert report["rejected_by_reason"] == {
        "null_user_id": 1,
        "empty_user_id": 1,
        "null_item_id": 1,
        "empty_item_id": 1,
        "user_id_too_long": 1,
        "unknown_event_type": 1,
        "null_timestamp": 1,
        "unparseable_timestamp": 2,
        "invalid_value": 2,
        "future_timestamp": 1,
        "outside_window": 1,
        "bot_user": 6,
    }
    # outside_window and future_timestamp are not counted: 17 of the 23 rows in the window
    assert report["reject_fraction"] == pytest.approx(17 / 23)
    assert (report["users"], report["items"], report["interactions"]) == (2, 2, 4)
    assert (report["new_users"], report["new_items"]) == (2, 2)
    assert report["window"] == ["2024-03-01", "2024-03-10"]

    # indices in sorted id order: u1 -> 0, u2 -> 1; i1 -> 0, i2 -> 1
    expected = spark.createDataFrame(
        [
            (0, 0, 1.0, 1, ts("2024-03-10 10:00:00"), ts("2024-03-10 10:00:00")),
            (0, 1, 12.0, 1, ts("2024-03-09 12:00:00"), ts("2024-03-09 12:00:00")),
            (1, 0, 30.0, 2, ts("2024-03-05 00:00:00"), ts("2024-03-06 00:00:00")),
            (1, 1, -2.0, 1, ts("2024-03-06 00:00:00"), ts("2024-03-06 00:00:00")),
        ],
        INTERACTION_SCHEMA,
    )
    # (u2, i1) is 40 - 10 = 30; (u2, i2) is negative
    assert_df_equality(result.interactions, expected, ignore_row_order=True, ignore_nullable=True)
    result.unpersist()
    table = format_report_table(report)
    assert "bot_user" in table and "25" in table


def test_conservation_check_raises_when_rows_go_missing():
    report = {
        "rows_read": 10,
        "accepted_events": 5,
        "rejected": 3,
        "deduplicated": 1,
        "rejected_by_reason": {"x": 3},
    }
    with pytest.raises(ConservationError, match="rows read 10"):
        check_conservation(report)
    check_conservation({**report, "deduplicated": 2})


def test_support_filter_rows_are_rejected_below_min_support(spark, tmp_path):
    rows = [
        ("a", "x", "view", "2024-03-10 01:00:00", None),
        ("a", "x", "view", "2024-03-10 01:00:00", None),  # duplicate: stays deduplicated
        ("a", "y", "view", "2024-03-10 02:00:00", None),
        ("b", "x", "view", "2024-03-10 03:00:00", None),
        ("b", "y", "view", "2024-03-10 04:00:00", None),
        ("c", "y", "view", "2024-03-10 05:00:00", None),  # c has one item
        ("c", "y", "view", "2024-03-09 05:00:00", None),  # (second event of the same pair)
        ("a", "z", "view", "2024-03-10 06:00:00", None),  # z has one user
    ]
    path = write_parquet(tmp_path / "events.parquet", rows)
    result = ingest(
        spark,
        path,
        tmp_path,
        min_events_per_user=2,
        min_events_per_item=2,
        k_core=True,
        max_reject_fraction=0.0,
    )
    report = result.report
    assert report["rejected_by_reason"] == {"below_min_support": 3}
    assert report["reject_fraction"] == 0.0  # support filters are not bad data
    assert (report["accepted_events"], report["deduplicated"], report["rows_read"]) == (4, 1, 8)
    expected = spark.createDataFrame(
        [
            ("c", "y", "view", "2024-03-10 05:00:00", None, "below_min_support", "events.parquet"),
            ("c", "y", "view", "2024-03-09 05:00:00", None, "below_min_support", "events.parquet"),
            ("a", "z", "view", "2024-03-10 06:00:00", None, "below_min_support", "events.parquet"),
        ],
        REJECT_SCHEMA,
    )
    assert_df_equality(strings(result.rejects), expected, ignore_row_order=True, ignore_nullable=True)
    assert sorted(r["user_id"] for r in result.dim_user.collect()) == ["a", "b"]
    assert result.interactions.count() == 4
    result.unpersist()


def test_reject_threshold_fails_and_publishes_no_id_map(spark, tmp_path):
    rows = [
        ("u1", "i1", "view", "2024-03-10 01:00:00", None),
        (None, "i1", "view", "2024-03-10 01:00:00", None),
        ("u1", "i1", "click", "2024-03-10 01:00:00", None),
        ("u1", "i1", "view", "2020-01-01 00:00:00", None),  # outside the window: not counted
        ("u1", "i1", "view", "2024-03-11 01:00:00", None),  # after the run date: not counted either
        (None, "i1", "click", "2024-03-11 02:00:00", None),  # nor its problems: a later run's row
    ]
    path = write_parquet(tmp_path / "events.parquet", rows)
    with pytest.raises(RejectThresholdError) as info:
        ingest(spark, path, tmp_path, max_reject_fraction=0.5)
    message = str(info.value)
    assert "66.67%" in message and "null_user_id=1" in message and "unknown_event_type=1" in message
    assert "max_reject_fraction" in message and str(path) in message
    # which event types the config lacks: a wrong ingest.event_types rejects everything for this reason
    assert ("Event types rejected as unknown, commonest first: 'click' (1); configured in ingest.event_types: "
            "purchase, return, view.") in message
    assert read_pointer(str(tmp_path / "id_maps")) is None
    assert "(rows read in the window: 3)" in message and "future_timestamp" not in message
    # exactly at the limit passes
    assert ingest(spark, path, tmp_path, max_reject_fraction=2 / 3).report["rejected"] == 5


def test_a_nightly_after_midnight_over_an_unpartitioned_log_is_not_failed_by_the_new_day(spark, tmp_path):
    """The cron runs at 03:30 UTC for yesterday: today's first hours are in the log, and counting them
    as rejects failed the run (15 of 115 rows) with exit 4."""
    rows = [(f"u{n % 7}", f"i{n % 11}", "view", f"2024-03-10 {n % 24:02d}:00:00", None) for n in range(100)]
    rows += [(f"u{n}", "i1", "view", f"2024-03-11 0{n % 3}:30:00", None) for n in range(15)]
    report = ingest(spark, write_parquet(tmp_path / "events.parquet", rows), tmp_path, lookback_days=1,
                    max_reject_fraction=0.01).report
    assert report["rejected_by_reason"] == {"future_timestamp": 15} and report["reject_fraction"] == 0.0


def test_ids_that_are_not_utf8_are_rejected_until_the_encoding_is_given(spark, tmp_path):
    """A Latin-1 CSV read as UTF-8 turned "jos\xe9" and "jos\xe8" into one user "jos\ufffd" (exit 0)."""
    path = tmp_path / "events" / "part-0.csv"
    path.parent.mkdir()
    path.write_bytes("user_id,item_id,event_type,event_ts,value\n"
                     "jos\xe9,i1,view,2024-03-09 12:00:00,\njos\xe8,i1,view,2024-03-09 12:00:00,\n"
                     "joss,i1,view,2024-03-09 12:00:00,\n".encode("latin-1"))
    with pytest.raises(RejectThresholdError, match=r"invalid_encoding=2.*input\.options\.encoding, e\.g\. "
                                                   r'"ISO-8859-1"'):
        ingest(spark, path.parent, tmp_path, fmt="csv", options={"header": "true"}, max_reject_fraction=0.5)
    result = ingest(spark, path.parent, tmp_path, fmt="csv", options={"header": "true"}, id_maps="a")
    assert result.report["rejected_by_reason"] == {"invalid_encoding": 2}
    assert [r["user_id"] for r in result.dim_user.collect()] == ["joss"]
    result.unpersist()
    result = ingest(spark, path.parent, tmp_path, fmt="csv", options={"header": "true", "encoding": "ISO-8859-1"},
                    id_maps="b")
    assert sorted(r["user_id"] for r in result.dim_user.collect()) == ["joss", "jos\xe8", "jos\xe9"]
    result.unpersist()


def test_no_events_in_the_window_is_an_input_error(spark, tmp_path):
    path = write_parquet(tmp_path / "events.parquet", [("u1", "i1", "view", "2023-01-01 00:00:00", None)])
    with pytest.raises(InputDataError, match=r"no events in the window 2024-03-01 \.\. 2024-03-10"):
        ingest(spark, path, tmp_path)


def test_partitioned_input_is_pruned_to_the_window(spark, tmp_path):
    root = tmp_path / "events"
    for day in ("2024-02-29", "2024-03-01", "2024-03-10", "2024-03-11"):
        write_parquet(
            root / f"event_date={day}" / "part-0.parquet",
            [("u1", f"i{day[-2:]}", "view", f"{day} 12:00:00", None)],
        )
    # a partition whose rows lie about their date: counted, and rejected by the timestamp
    write_parquet(
        root / "event_date=2024-03-05" / "part-0.parquet",
        [("u1", "late", "view", "2024-03-12 00:00:00", None)],
    )
    result = ingest(spark, root, tmp_path)
    report = result.report
    assert report["partition_pruned"] is True
    assert report["rows_read"] == 3  # 03-01, 03-05, 03-10; 02-29 and 03-11 are never read
    assert report["rejected_by_reason"] == {"future_timestamp": 1}
    assert sorted(r["item_id"] for r in result.dim_item.collect()) == ["i01", "i10"]
    result.unpersist()


def test_compact_and_non_date_partitions(spark, tmp_path, caplog):
    """event_date=yyyyMMdd (an int column to Spark) failed with a raw AnalysisException; a partition whose
    value is not a date (Spark's null partition, a mislabelled directory) was dropped unread and uncounted."""
    root = tmp_path / "events"
    for day in ("20240229", "20240305", "20240311"):
        iso = f"{day[:4]}-{day[4:6]}-{day[6:]}"
        write_parquet(root / f"event_date={day}" / "part-0.parquet", [("u1", f"i{day[-2:]}", "view", f"{iso} 12:00:00", None)])
    result = ingest(spark, root, tmp_path)
    assert result.report["rows_read"] == 1 and [r["item_id"] for r in result.dim_item.collect()] == ["i05"]
    result.unpersist()

    write_parquet(root / "event_date=__HIVE_DEFAULT_PARTITION__" / "part-0.parquet",
                  [("u1", "inull", "view", "2024-03-09 12:00:00", None)])
    write_parquet(root / "event_date=2024-03-10_retry" / "part-0.parquet",
                  [("u1", "iretry", "view", "2024-03-10 12:00:00", None), ("u1", "iold", "view", "2024-01-01 00:00:00", None)])
    with caplog.at_level(logging.WARNING, logger="mf_spark"):
        result = ingest(spark, root, tmp_path, id_maps="id_maps_2")
    assert "event_date=2024-03-10_retry" in caplog.text and "event_date=__HIVE_DEFAULT_PARTITION__" in caplog.text
    assert result.report["rows_read"] == 4  # 03-05 and the three rows of the two odd partitions
    assert result.report["rejected_by_reason"] == {"outside_window": 1}
    assert sorted(r["item_id"] for r in result.dim_item.collect()) == ["i05", "inull", "iretry"]
    result.unpersist()


def test_a_pandas_parquet_file_with_nanosecond_timestamps_is_an_input_error(spark, tmp_path):
    table = pa.table({"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"],
                      "event_ts": pa.array([dt.datetime(2024, 3, 9, 12)], pa.timestamp("ns")), "value": [None]})
    path = tmp_path / "events" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)  # what pandas' to_parquet writes by default
    with pytest.raises(InputDataError, match="cannot be read as parquet.*coerce_timestamps='us'"):
        ingest(spark, path.parent, tmp_path)


@pytest.mark.parametrize("damage", ["other_type", "truncated"])
def test_a_damaged_event_file_beside_good_ones_is_an_input_error_naming_it(spark, tmp_path, damage):
    """read_raw sniffs one file and Spark infers the schema from one footer: a second file whose user_id
    is int64, or a truncated one, failed at the first count with a Py4J trace (exit 1)."""
    good = write_parquet(tmp_path / "events" / "part-0.parquet", [("u1", "i1", "view", "2024-03-09 12:00:00", None)])
    bad = tmp_path / "events" / "part-1.parquet"
    if damage == "other_type":
        table = pa.table({"user_id": pa.array([7], pa.int64()), "item_id": ["i2"], "event_type": ["view"],
                          "event_ts": ["2024-03-09 12:00:00"], "value": pa.array([None], pa.string())})
        pq.write_table(table, bad)
        expected = r"part-1\.parquet.*column \[user_id\].*INT64"
    else:
        bad.write_bytes(good.read_bytes()[:-20])  # starts with PAR1 like a Parquet file, footer cut off
        expected = r"part-1\.parquet"
    with pytest.raises(InputDataError, match=r"input\.path = .*events: an event file cannot be read: .*" + expected) as err:
        ingest(spark, good.parent, tmp_path)
    assert "Job aborted" not in str(err.value) and "SQLSTATE" not in str(err.value)  # Spark's sentence only
    assert not (tmp_path / "id_maps").exists()


def test_a_strength_beyond_float32_fails_before_any_id_map(spark, tmp_path):
    # each value is finite in float32, but weight 4 times it (summed) is not
    rows = [("u1", "i1", "purchase", "2024-03-09 12:00:00", "3e38"), ("u1", "i2", "view", "2024-03-09 12:00:00", None)]
    path = write_parquet(tmp_path / "events" / "part-0.parquet", rows)
    huge = RULES | {"purchase": EventTypeRule(weight=4.0, use_value=True)}
    with pytest.raises(InputDataError, match="1 .user, item. pairs .* beyond float32's range.*value_cap"):
        ingest(spark, path.parent, tmp_path, rules=settings(event_types=huge))
    assert not (tmp_path / "id_maps").exists()


def test_outputs_do_not_depend_on_files_or_shuffle_partitions(spark, tmp_path):
    """docs/ingest.md: the same events give the same tables whether they come in one file or five, in
    any row order, under any spark.sql.shuffle.partitions (strengths are summed in value order)."""
    import random

    rng = random.Random(4)
    # many events per pair, large values of both signs: a sum in arrival order differs after the cast to
    # float32 (purchase 1e8 * 4 against return 2e8 * -2 around a small remainder)
    rows = [(f"u{rng.randrange(5)}", f"i{rng.randrange(6)}", rng.choice(["view", "purchase", "return"]),
             f"2024-03-{rng.randrange(2, 11):02d} {rng.randrange(24):02d}:00:00", repr(rng.choice([0.1, 0.3, 1e8, 2e8])))
            for _ in range(2000)]
    uncapped = RULES | {"purchase": EventTypeRule(weight=4.0, use_value=True)}
    rows += rows[:300]  # exact duplicates
    # one pair whose sum depends on the order: in ascending order -4e15, 0.4, 0.8, 1.2, 4e15 (no decay)
    crafted = [("uc", "ic", "purchase", "2024-03-09 12:00:00", v) for v in ("1e15", "0.1", "0.2", "0.3")]
    rows += crafted + [("uc", "ic", "return", "2024-03-09 12:00:00", "2e15")]
    expected = 0.0
    for contribution in sorted([4.0 * 1e15, 4.0 * 0.1, 4.0 * 0.2, 4.0 * 0.3, -2.0 * 2e15]):
        expected += contribution
    assert np.float32(expected) != np.float32(4e15 - 4e15 + 0.4 + 0.8 + 1.2)  # the order shows
    rows.append(("u1", None, "view", "2024-03-09 12:00:00", None))  # one reject
    one = write_parquet(tmp_path / "one" / "part-0.parquet", rows).parent
    shuffled = rows[:]
    rng.shuffle(shuffled)
    for k in range(5):
        write_parquet(tmp_path / "five" / f"part-{k}.parquet", shuffled[k::5])
    before = spark.conf.get("spark.sql.shuffle.partitions")
    results = []
    try:
        for path, partitions in ((one, "1"), (tmp_path / "five", "7"), (one, "3")):
            spark.conf.set("spark.sql.shuffle.partitions", partitions)
            results.append(ingest(spark, path, tmp_path, id_maps=f"maps_{len(results)}", rules=settings(
                event_types=uncapped, max_events_per_user_day=1000)))
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    first = results[0]
    crafted_strength = (first.interactions.join(first.dim_user.where(F.col("user_id") == "uc"), "user_idx")
                        .join(first.dim_item.where(F.col("item_id") == "ic"), "item_idx").first()["strength"])
    assert np.float32(crafted_strength) == np.float32(expected)
    for other in results[1:]:
        assert_df_equality(first.interactions, other.interactions, ignore_row_order=True)  # exact strengths
        assert_df_equality(first.rejects.drop("source_file"), other.rejects.drop("source_file"), ignore_row_order=True)
        assert_df_equality(first.dim_user, other.dim_user, ignore_row_order=True)
        assert_df_equality(first.dim_item, other.dim_item, ignore_row_order=True)
        assert other.report["deduplicated"] == first.report["deduplicated"] > 0
    for result in results:
        result.unpersist()


def test_two_runs_give_identical_outputs(spark, tmp_path):
    path = write_parquet(tmp_path / "events.parquet", ALL_REASONS)
    first = ingest(spark, path, tmp_path, run_id="r1", max_events_per_user_day=3, half_life_days=3.0)
    second = ingest(spark, path, tmp_path, run_id="r2", max_events_per_user_day=3, half_life_days=3.0)
    fresh = ingest(
        spark,
        path,
        tmp_path,
        run_id="r3",
        id_maps="other_maps",
        max_events_per_user_day=3,
        half_life_days=3.0,
    )
    for other in (second, fresh):
        assert_df_equality(first.interactions, other.interactions, ignore_row_order=True)
        assert_df_equality(first.rejects, other.rejects, ignore_row_order=True)
        assert_df_equality(first.dim_user, other.dim_user, ignore_row_order=True)
        assert_df_equality(first.dim_item, other.dim_item, ignore_row_order=True)
    assert {k: v for k, v in first.report.items() if k != "new_users" and k != "new_items"} == {
        k: v for k, v in second.report.items() if k != "new_users" and k != "new_items"
    }
    assert (second.report["new_users"], second.report["new_items"]) == (0, 0)
    # the second run had no new id: it wrote no map version and left the pointer alone
    assert read_pointer(str(tmp_path / "id_maps"))["run_id"] == "r1"
    json.dumps(first.report)  # the report is plain JSON
    for result in (first, second, fresh):
        result.unpersist()


ONE_PURCHASE = [("u1", "i1", "purchase", "2024-03-09 10:00:00", "1")]


def test_a_run_date_without_events_is_warned_about(spark, tmp_path, caplog):
    """A day's partition that never arrived looked like a quiet day: the window's older events trained and
    published a model with nothing in the log."""
    path = write_parquet(tmp_path / "events" / "part-0.parquet", [*ONE_PURCHASE, ("u2", "i1", "view", "2024-03-08 09:30:00", None)])
    with caplog.at_level(logging.WARNING, logger="mf_spark.ingest"):
        result = ingest(spark, path.parent, tmp_path)
    assert result.report["newest_event"] == "2024-03-09 10:00:00"
    assert ("no accepted event is dated 2024-03-10, the run date: the newest is from 2024-03-09 10:00:00"
            in caplog.text)
    assert "newest event" in format_report_table(result.report)
    result.unpersist()


def job_config(tmp_path: Path, events: Path) -> tuple[Path, list[str]]:
    """conf/local.toml pointed at ``events`` and a fresh output root: the ingest job's config."""
    repo = Path(__file__).resolve().parents[1]
    overrides = [
        f"input.path={events}",
        f"output.root={tmp_path / 'root'}",
        "ingest.lookback_days=10",
        "ingest.max_reject_fraction=1.0",
    ]
    return repo / "conf" / "local.toml", overrides


def test_ingest_job_writes_its_outputs_holding_the_output_root_lock(spark, tmp_path, monkeypatch):
    from mf_spark.config import load_config
    from mf_spark.ingest import stage
    from mf_spark.publish import read_lock

    events = write_parquet(tmp_path / "events.parquet", ONE_PURCHASE)
    config, overrides = job_config(tmp_path, events)
    cfg = load_config(config, overrides)
    root = tmp_path / "root"
    holders = []
    real_update = stage.update_id_maps

    def spy(*args, **kwargs):
        holders.append(read_lock(str(root)))
        return real_update(*args, **kwargs)

    monkeypatch.setattr(stage, "update_id_maps", spy)
    report = stage.run_ingest_job(spark, cfg, RUN_DATE)
    assert [(h["purpose"], h["pid"]) for h in holders] == [("ingest", os.getpid())]
    assert read_lock(str(root)) is None  # released
    out = root / "ingest" / "dt=2024-03-10"
    assert json.loads((out / "report.json").read_text())["interactions"] == report["interactions"] == 1
    assert spark.read.parquet(str(out / "interactions")).count() == 1
    assert read_pointer(str(root / "id_maps"))["maps"]["dim_user"]["size"] == 1


def test_an_ingest_job_rerun_that_fails_halfway_keeps_the_previous_set(spark, tmp_path, monkeypatch):
    """The job overwrote interactions/, then rejects/, then report.json: a rerun failing in between left
    the new interactions beside the old report."""
    from mf_spark.config import load_config
    from mf_spark.ingest import stage

    write_parquet(tmp_path / "in" / "a.parquet", ONE_PURCHASE)
    config, overrides = job_config(tmp_path, tmp_path / "in")
    stage.run_ingest_job(spark, load_config(config, overrides), RUN_DATE)
    out = tmp_path / "root" / "ingest" / "dt=2024-03-10"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_parquet(tmp_path / "in" / "b.parquet", [("u2", "i9", "purchase", "2024-03-09 10:00:00", "1")])
    more = overrides

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stage, "write_report", fail)
    with pytest.raises(OSError, match="disk full"):
        stage.run_ingest_job(spark, load_config(config, more), RUN_DATE)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dt=2024-03-10"]  # no staging left behind
    monkeypatch.undo()
    assert stage.run_ingest_job(spark, load_config(config, more), RUN_DATE)["interactions"] == 2
    assert spark.read.parquet(str(out / "interactions")).count() == 2


def test_ingest_job_on_a_locked_root_exits_6_naming_the_holder(tmp_path):
    """A nightly holds the lock: the ingest job must not touch the ID maps it is extending."""
    from mf_spark.errors import LockHeldError
    from mf_spark.publish import RunLock

    events = write_parquet(tmp_path / "events.parquet", ONE_PURCHASE)
    config, overrides = job_config(tmp_path, events)
    root = tmp_path / "root"
    repo = config.parents[1]
    command = [
        sys.executable, str(repo / "jobs" / "ingest.py"), "--config", str(config), "--date", "2024-03-10",
        "--break-stale-lock",  # never breaks a live holder's lock
    ]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(repo)}
    with RunLock(str(root), RUN_DATE):  # held by this (live) process, as a running nightly would
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert done.returncode == LockHeldError.exit_code, done.stderr[-4000:]
    message = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    assert f"is locked by nightly run on host {socket.gethostname()} pid {os.getpid()}" in message
    assert "still running" in message and "Traceback" not in done.stderr
    assert not (root / "id_maps").exists() and not (root / "ingest").exists()


def test_when_every_row_is_rejected_the_ingest_job_still_writes_the_rejects(spark, tmp_path):
    """The documented way to inspect the rejects of an exit-4 run is this job with
    max_reject_fraction=1.0; when every row was rejected it exited 3 before writing rejects/ or the report."""
    from mf_spark.config import load_config
    from mf_spark.errors import NoInteractionsLeftError
    from mf_spark.ingest import stage

    rows = [("u1", "i1", "click", "2024-03-09 10:00:00", None), ("", "i2", "view", "2024-03-09 11:00:00", None)]
    events = write_parquet(tmp_path / "events.parquet", rows)
    config, overrides = job_config(tmp_path, events)
    out = tmp_path / "root" / "ingest" / "dt=2024-03-10"
    (out / "interactions").mkdir(parents=True)  # an earlier run's: it must not sit beside these rejects
    (out / "interactions" / "part-0.parquet").write_text("stale")
    with pytest.raises(NoInteractionsLeftError, match=f"rejected rows, with their reason, are in {out / 'rejects'}"):
        stage.run_ingest_job(spark, load_config(config, overrides), RUN_DATE)
    reasons = sorted(r.reason for r in spark.read.parquet(str(out / "rejects")).collect())
    report = json.loads((out / "report.json").read_text())
    assert len(reasons) == 2 and report["rejected"] == 2 and "no interaction left" in report["error"]
    assert not (out / "interactions").exists()


def test_the_report_file_gets_the_mode_of_every_other_file(tmp_path):
    """report.json came from mkstemp: 0600, unreadable by the accounts that read the run's other files."""
    from mf_spark.ingest import write_report

    old = os.umask(0o022)
    try:
        write_report({"rows_read": 1, "accepted_events": 1}, tmp_path / "out" / "report.json")
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"rows_read": 1, "accepted_events": 1}
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "report.json"]  # no temporary left
