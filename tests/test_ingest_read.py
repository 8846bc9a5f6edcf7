"""Reading raw events: formats, timestamp forms, schema errors, partition pruning."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality

from mf_spark.errors import InputDataError
from mf_spark.ingest import EventTypeRule, IngestSettings, run_ingest
from mf_spark.ingest.read import event_window, partition_column, prune_to_window, read_raw, to_canonical

RUN_DATE = dt.date(2024, 3, 10)
COLUMNS = {"user_id": "uid", "item_id": "sku", "event_type": "kind", "event_ts": "at", "value": "qty"}
SETTINGS = IngestSettings(
    lookback_days=10,
    max_reject_fraction=1.0,
    event_types={"view": EventTypeRule(1.0), "purchase": EventTypeRule(2.0, use_value=True)},
)


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def write_parquet(path: Path, columns: dict[str, pa.Array]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def canonical(spark, path: Path, columns=COLUMNS, value_required=True, fmt="parquet", options=None):
    raw = read_raw(spark, str(path), fmt, options or {})
    return to_canonical(raw, columns, str(path), value_required, options)


def test_timestamp_forms_and_raw_strings(spark, tmp_path):
    path = write_parquet(
        tmp_path / "e.parquet",
        {
            "uid": pa.array([17850] * 9, pa.int64()),  # numeric ids become strings
            "sku": ["a", "b", "c", "d", "e", "f", "g", "h", "i"],
            "kind": ["view"] * 9,
            "at": [
                "2024-03-10 08:26:00",
                "2024-03-10T08:26:00.5+01:00",
                "2024-03-10",
                "1710059160",
                "10/03/2024",
                "20240310",  # was read as epoch seconds: a 1970 instant, rejected as outside the window
                "2024",  # Spark's cast takes it as 2024-01-01
                "2024-03",
                "1710059160000",  # epoch milliseconds: was year 56,000, a future_timestamp
            ],
            "qty": ["1.5", "NaN", " 3 ", "x", None, None, None, None, None],
        },
    )
    actual = canonical(spark, path).select(
        "user_id", "item_id", "event_ts", "value", "raw_event_ts", "raw_value"
    )
    expected = spark.createDataFrame(
        [
            ("17850", "a", ts("2024-03-10 08:26:00"), 1.5, "2024-03-10 08:26:00", "1.5"),
            ("17850", "b", ts("2024-03-10 07:26:00.5"), float("nan"), "2024-03-10T08:26:00.5+01:00", "NaN"),
            ("17850", "c", ts("2024-03-10 00:00:00"), 3.0, "2024-03-10", " 3 "),
            ("17850", "d", ts("2024-03-10 08:26:00"), None, "1710059160", "x"),
            ("17850", "e", None, None, "10/03/2024", None),
            ("17850", "f", None, None, "20240310", None),
            ("17850", "g", None, None, "2024", None),
            ("17850", "h", None, None, "2024-03", None),
            ("17850", "i", None, None, "1710059160000", None),
        ],
        "user_id string, item_id string, event_ts timestamp, value double, "
        "raw_event_ts string, raw_value string",
    )
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True, allow_nan_equality=True)


def test_epoch_seconds_and_native_timestamps(spark, tmp_path):
    epoch = write_parquet(
        tmp_path / "epoch.parquet",
        {
            "uid": ["u"] * 4,
            "sku": ["a", "b", "c", "d"],
            "kind": ["view"] * 4,
            "at": pa.array([1710059160, 10**15, 20240310, 1710059160000], pa.int64()),
            "qty": pa.array([1, 2, 3, 4], pa.int32()),
        },
    )
    actual = canonical(spark, epoch).select("item_id", "event_ts", "value")
    # 10**15 seconds is past year 9999: unparseable, not an exception under ANSI mode. A date as digits
    # was a 1970 instant (silently outside the window), epoch milliseconds a year-56,000 one (future):
    # both are unparseable, as the string forms are
    expected = spark.createDataFrame(
        [("a", ts("2024-03-10 08:26:00"), 1.0), ("b", None, 2.0), ("c", None, 3.0), ("d", None, 4.0)],
        "item_id string, event_ts timestamp, value double",
    )
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)

    native = write_parquet(
        tmp_path / "native.parquet",
        {
            "uid": ["u"],
            "sku": ["a"],
            "kind": ["view"],
            "at": pa.array([dt.datetime(2024, 3, 10, 8, 26)], pa.timestamp("us", tz="UTC")),
            "qty": pa.array([None], pa.float64()),
        },
    )
    row = canonical(spark, native).first()
    assert row["event_ts"] == dt.datetime(2024, 3, 10, 8, 26) and row["value"] is None


def test_missing_path_and_empty_directory(spark, tmp_path):
    with pytest.raises(InputDataError, match=r"input path .*nowhere does not exist"):
        read_raw(spark, str(tmp_path / "nowhere"), "parquet", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no readable parquet files"):
        read_raw(spark, str(tmp_path / "empty"), "parquet", {})


def test_an_unreadable_uri_names_the_key(spark):
    # conf/cluster.toml's hdfs:/// input run without HDFS: a Py4J traceback and exit 1 before.
    with pytest.raises(InputDataError, match=r"^input.path = hdfs:///no/name/node cannot be read: java.io.IOExc"):
        read_raw(spark, "hdfs:///no/name/node", "parquet", {})


def test_a_reader_option_spark_cannot_parse_names_input_options(spark, tmp_path):
    """input.options.mergeSchema = "maybe" was a Python traceback (exit 1) saying only 'For input string'."""
    from mf_spark.errors import ConfigError

    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"]}), tmp_path / "part-0.parquet")
    with pytest.raises(ConfigError, match=r"^input\.options \(mergeSchema = 'maybe'\): Spark's parquet reader "
                                          r"refused them: .*maybe"):
        read_raw(spark, str(tmp_path), "parquet", {"mergeSchema": "maybe"})


def _events_dirs(tmp_path: Path) -> dict[str, Path]:
    """The same event as partitioned Parquet, a CSV directory and a JSON file, with Spark's side files."""
    row = {"uid": "u", "sku": "a", "kind": "view", "at": "2024-03-10 08:00:00", "qty": "1"}
    parquet = tmp_path / "parquet"
    write_parquet(parquet / "event_date=2024-03-10" / "part-0.parquet", {k: [v] for k, v in row.items()})
    (parquet / "_SUCCESS").touch()
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "_SUCCESS").touch()
    (csv / ".part-0.csv.crc").write_bytes(b"crc\x00\x01")  # hidden: Spark skips it, so must the check
    (csv / "part-0.csv").write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
    json_file = tmp_path / "events.json"
    json_file.write_text("\n" + json.dumps(row) + "\n")  # a leading blank line is still JSON lines
    return {"parquet": parquet, "csv": csv, "json": json_file}


@pytest.mark.parametrize(
    ("data", "fmt", "options", "found"),
    [
        ("parquet", "csv", {"header": "true"}, r"part-0.parquet looks like Parquet"),
        ("parquet", "csv", {}, r"part-0.parquet looks like Parquet"),
        ("parquet", "json", {}, r"part-0.parquet looks like Parquet"),
        ("csv", "parquet", {}, r"part-0.csv looks like CSV"),
        ("json", "parquet", {}, r"the file looks like JSON"),
        ("json", "csv", {"header": "true"}, r"the file looks like JSON"),
        ("csv", "json", {}, r"no line is a JSON record"),
    ],
)
def test_wrong_format_names_path_key_and_what_was_found(spark, tmp_path, data, fmt, options, found):
    path = _events_dirs(tmp_path)[data]
    # before: a missing column listing garbage or _corrupt_record, or a raw Spark footer trace (exit 1)
    with pytest.raises(InputDataError) as info:
        canonical(spark, path, fmt=fmt, options=options)
    message = str(info.value)
    assert f"input path {path} does not hold {fmt} data (input.format = '{fmt}')" in message
    assert re.search(found, message), message


def test_an_event_file_without_read_permission_is_an_input_error(spark, tmp_path, monkeypatch):
    """PermissionError from the format check was a traceback (exit 1). Tests run as root, which chmod
    cannot stop, so the file's open() fails the way it does for an ordinary user."""
    from mf_spark.ingest import read as read_module

    path = _events_dirs(tmp_path)["csv"]

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(read_module, "open", denied, raising=False)
    with pytest.raises(InputDataError, match=rf"^input file {path}/part-0\.csv cannot be read: Permission denied "
                                             r"\(input\.path\)$"):
        read_raw(spark, str(path), "csv", {"header": "true"})


def test_wrong_format_of_a_remote_path(spark, tmp_path):
    # a URI skips the local magic-byte check: Spark's own failure or schema is translated
    dirs = _events_dirs(tmp_path)
    uri = dirs["csv"].as_uri()
    with pytest.raises(InputDataError, match=r"'parquet'\): Spark found files that are not Parquet \(e.g. "):
        read_raw(spark, uri, "parquet", {})
    uri = dirs["parquet"].as_uri()
    with pytest.raises(InputDataError, match=r"input.format = 'csv'\): the CSV header is binary"):
        read_raw(spark, uri, "csv", {"header": "true"})
    with pytest.raises(InputDataError, match=r"input.format = 'json'\): no line is a JSON record"):
        read_raw(spark, uri, "json", {})


def test_right_format_still_reads(spark, tmp_path):
    dirs = _events_dirs(tmp_path)
    gz = tmp_path / "gz"
    gz.mkdir()
    with gzip.open(gz / "part-0.json.gz", "wt") as f:  # compressed text is not mistaken for a format
        f.write(dirs["json"].read_text())
    reads = [
        (dirs["parquet"], "parquet", {}),
        (dirs["parquet"] / "event_date=2024-03-10" / "part-0.parquet", "parquet", {}),
        (dirs["csv"], "csv", {"header": "true"}),
        (dirs["csv"] / "part-0.csv", "csv", {"header": "true"}),
        (dirs["json"], "json", {}),
        (gz, "json", {}),
    ]
    for path, fmt, options in reads:
        assert canonical(spark, path, fmt=fmt, options=options).select("item_id").collect() == [("a",)]


def test_empty_csv_names_the_file(spark, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.touch()
    # before: "column 'uid' ... is missing in ...; columns found: " with an empty list
    with pytest.raises(InputDataError, match=r"input file .*empty.csv is empty: no header and no rows"):
        canonical(spark, empty, fmt="csv", options={"header": "true"})
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    with pytest.raises(InputDataError, match=r"input file .*blank.csv is empty: no header and no rows"):
        canonical(spark, blank, fmt="csv", options={"header": "true"})
    directory = tmp_path / "dir" / "event_date=2024-03-10"
    directory.mkdir(parents=True)
    (directory / "a.csv").touch()
    (directory / "b.csv").touch()
    with pytest.raises(InputDataError, match=r"every file under input path .*dir is empty"):
        canonical(spark, tmp_path / "dir", fmt="csv", options={"header": "true"})
    with pytest.raises(InputDataError, match=r"input file .*empty.csv is empty: no records"):
        canonical(spark, empty, fmt="json")
    # a header and no rows is a readable, empty table: the stage reports "no events in the window"
    header_only = tmp_path / "header.csv"
    header_only.write_text("uid,sku,kind,at,qty\n")
    assert canonical(spark, header_only, fmt="csv", options={"header": "true"}).count() == 0


def test_missing_column_names_column_and_path(spark, tmp_path):
    path = write_parquet(
        tmp_path / "e.parquet", {"uid": ["u"], "sku": ["a"], "kind": ["view"], "at": ["2024-03-10"]}
    )
    with pytest.raises(InputDataError) as info:
        canonical(spark, path)  # a purchase uses values: the value column is required
    message = str(info.value)
    assert "'qty'" in message and "input.columns.value" in message and str(path) in message
    # without a type that uses values, a missing value column is fine: every value is null
    assert canonical(spark, path, value_required=False).first()["value"] is None
    no_item = write_parquet(
        tmp_path / "e2.parquet", {"uid": ["u"], "kind": ["view"], "at": ["x"], "qty": ["1"]}
    )
    with pytest.raises(InputDataError, match=r"'sku' \(input.columns.item_id\) is missing in .*e2.parquet"):
        canonical(spark, no_item)


@pytest.mark.parametrize(
    ("column", "array", "wanted"),
    [
        ("at", pa.array([True]), "timestamp"),
        ("uid", pa.array([[1, 2]], pa.list_(pa.int64())), "string"),
        ("qty", pa.array([True]), "double"),
    ],
)
def test_uncastable_type_names_column_and_path(spark, tmp_path, column, array, wanted):
    columns = {"uid": ["u"], "sku": ["a"], "kind": ["view"], "at": ["2024-03-10"], "qty": ["1"]}
    columns[column] = array
    path = write_parquet(tmp_path / "e.parquet", columns)
    with pytest.raises(InputDataError) as info:
        canonical(spark, path)
    message = str(info.value)
    assert f"'{column}'" in message and str(path) in message and f"cannot be cast to {wanted}" in message


def test_partition_filter_reaches_the_scan(spark, tmp_path):
    root = tmp_path / "events"
    for day in ("2024-02-20", "2024-03-05", "2024-03-20"):
        write_parquet(root / f"event_date={day}" / "p.parquet", {"uid": ["u"], "sku": [day]})
    raw = read_raw(spark, str(root), "parquet", {})
    assert partition_column(raw, "event_date") == "event_date"
    assert partition_column(raw, "uid") is None  # a data column is not a partition column
    pruned = prune_to_window(raw, "event_date", event_window(RUN_DATE, 10))
    # the scan prints at most 100 characters of its filters, and expression ids grow over a long session
    previous = spark.conf.get("spark.sql.maxMetadataStringLength")
    spark.conf.set("spark.sql.maxMetadataStringLength", "1000")
    try:
        plan = pruned._jdf.queryExecution().executedPlan().toString()
    finally:
        spark.conf.set("spark.sql.maxMetadataStringLength", previous)
    # the window's dates, and null (a value that is not a date: read, and judged by event_ts)
    filters = plan.split("PartitionFilters: [", 1)[1].split("]", 1)[0]
    assert "isnull(event_date" in filters and ">= 2024-03-01" in filters and "<= 2024-03-10" in filters
    assert [r["sku"] for r in pruned.collect()] == ["2024-03-05"]
    assert (
        partition_column(read_raw(spark, str(root / "event_date=2024-03-05"), "parquet", {}), "event_date")
        is None
    )


def _run(spark, path, tmp_path, fmt, options):
    return run_ingest(
        spark,
        input_path=str(path),
        input_format=fmt,
        columns=COLUMNS,
        reader_options=options,
        settings=SETTINGS,
        run_date=RUN_DATE,
        id_map_root=str(tmp_path / "id_maps"),
        run_id="r1",
    )


EXPECTED_INTERACTIONS = [(0, 0, 1.0, 1), (0, 1, 5.0, 1), (1, 0, 2.0, 1)]


def _interactions(result):
    return result.interactions.select("user_idx", "item_idx", "strength", "n_events")


def test_csv_input(spark, tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "uid,sku,kind,at,qty\n"
        "u1,a,view,2024-03-10 08:00:00,\n"
        "u1,b,purchase,1710000000,2.5\n"  # epoch seconds in a CSV string column
        "u2,a,purchase,2024-03-09T10:00:00Z,\n"  # null value counts as 1
        ",a,view,2024-03-10 08:00:00,\n"
        "u2,b,purchase,2024-03-09 10:00:00,lots\n"
        "u3,a,view,2024-03-10 08:00:00,,EXTRA\n"  # too many fields: Spark cut them off silently
        "u3,b\n"  # too few: it padded with nulls (and called it an unknown event type)
    )
    result = _run(spark, path, tmp_path, "csv", {"header": "true"})
    expected = spark.createDataFrame(
        EXPECTED_INTERACTIONS, "user_idx int, item_idx int, strength float, n_events long"
    )
    assert_df_equality(_interactions(result), expected, ignore_row_order=True, ignore_nullable=True)
    assert result.report["rejected_by_reason"] == {"malformed_record": 2, "null_user_id": 1, "invalid_value": 1}
    assert {r["source_file"].rsplit("/", 1)[-1] for r in result.rejects.collect()} == {"events.csv"}
    result.unpersist()


def test_json_input_with_a_malformed_line(spark, tmp_path):
    path = tmp_path / "events.json"
    lines = [
        {"uid": "u1", "sku": "a", "kind": "view", "at": "2024-03-10 08:00:00"},
        {"uid": "u1", "sku": "b", "kind": "purchase", "at": 1710000000, "qty": 2.5},
        {"uid": "u2", "sku": "a", "kind": "purchase", "at": "2024-03-09T10:00:00Z", "qty": None},
    ]
    path.write_text("\n".join([*(json.dumps(x) for x in lines), '{"uid": "u3", "sku": ']) + "\n")
    result = _run(spark, path, tmp_path, "json", {})
    # mixed string/number timestamps make the JSON column a string; the epoch string still parses
    expected = spark.createDataFrame(
        EXPECTED_INTERACTIONS, "user_idx int, item_idx int, strength float, n_events long"
    )
    assert_df_equality(_interactions(result), expected, ignore_row_order=True, ignore_nullable=True)
    assert result.report["rejected_by_reason"] == {"malformed_record": 1}
    result.unpersist()


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_ids_are_read_as_written_whatever_the_inferred_type(spark, tmp_path, fmt):
    """With inferSchema (CSV) or JSON's own inference, an id column guessed as int merged "00123" and "123"
    into one id, and a night holding "12.5" made the column double: every other id became "17850.0",
    a new user to the ID map."""
    path = tmp_path / f"events.{fmt}"
    uids = ["00123", "123", "17850", "12.5"] if fmt == "csv" else ["17850", "13047", "12.5"]
    if fmt == "csv":
        path.write_text("uid,sku,kind,at,qty\n" + "".join(f"{u},7,view,2024-03-10 08:00:00,\n" for u in uids))
        options = {"header": "true", "inferSchema": "true"}
    else:  # JSON numbers (a leading zero is not valid JSON; one string id would make the column a string)
        path.write_text("\n".join(f'{{"uid": {u}, "sku": 7, "kind": "view", '
                                  f'"at": "2024-03-10 08:00:00", "qty": 1}}' for u in uids) + "\n")
        options = {}
    result = _run(spark, path, tmp_path, fmt, options)
    assert sorted(r.user_id for r in result.dim_user.collect()) == sorted(uids)
    assert [r.item_id for r in result.dim_item.collect()] == ["7"]
    result.unpersist()


def test_a_json_id_that_is_an_object_is_still_refused(spark, tmp_path):
    """Reading id columns as text must not turn a JSON object or list into the id '{"id": 5}'."""
    from mf_spark.errors import InputDataError

    path = tmp_path / "events.json"
    path.write_text('{"uid": {"id": 5}, "sku": 7, "kind": "view", "at": "2024-03-10 08:00:00", "qty": 1}\n')
    with pytest.raises(InputDataError, match=r"column 'uid' \(input\.columns\.user_id\) .* has type struct"):
        _run(spark, path, tmp_path, "json", {})


def test_nan_and_infinite_float_ids_are_null_ids(spark, tmp_path):
    """A double id column's NaN and inf became the users "NaN" and "Infinity", merging unrelated events."""
    path = write_parquet(tmp_path / "e.parquet", {
        "uid": pa.array([1.0, float("nan"), float("inf"), float("-inf")], pa.float64()),
        "sku": pa.array([2.0, 2.0, 2.0, float("nan")], pa.float32()),
        "kind": ["view"] * 4,
        "at": ["2024-03-10 08:00:00"] * 4,
        "qty": pa.array([None] * 4, pa.float64()),
    })
    rows = canonical(spark, path).select("user_id", "item_id").collect()
    expected = [("1.0", "2.0"), (None, "2.0"), (None, "2.0"), (None, None)]
    assert sorted(map(tuple, rows), key=str) == sorted(expected, key=str)


def test_negative_epoch_seconds_are_unparseable(spark, tmp_path):
    """abs() let -1710059160 through the epoch-seconds range as a 1915 instant."""
    path = write_parquet(tmp_path / "e.parquet", {
        "uid": ["u", "u"], "sku": ["a", "b"], "kind": ["view"] * 2,
        "at": pa.array([1710059160, -1710059160], pa.int64()), "qty": pa.array([1, 1], pa.int32()),
    })
    rows = dict(canonical(spark, path).select("item_id", "event_ts").collect())
    assert rows == {"a": dt.datetime(2024, 3, 10, 8, 26), "b": None}


def test_csv_ids_guessed_as_booleans_are_read_as_written(spark, tmp_path):
    """CSV holds only text: an item column of true/false guessed boolean by inferSchema is still ids."""
    path = tmp_path / "events.csv"
    path.write_text("uid,sku,kind,at,qty\nu1,true,view,2024-03-10 08:00:00,\nu2,false,view,2024-03-10 08:00:00,\n")
    result = _run(spark, path, tmp_path, "csv", {"header": "true", "inferSchema": "true"})
    assert sorted(r.item_id for r in result.dim_item.collect()) == ["false", "true"]
    result.unpersist()
