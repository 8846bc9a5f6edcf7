"""Reading raw events: the input path, the column mapping, type checks, the window and partition pruning.

The result of :func:`to_canonical` is the one shape every later rule works on:

=============== ========= ==========================================================================
column          type      meaning
=============== ========= ==========================================================================
user_id         string    raw user id cast to string (null stays null)
item_id         string    raw item id cast to string
event_type      string    raw event type cast to string
event_ts        timestamp parsed timestamp; null when absent or unparseable
value           double    parsed value; null when absent or unparseable
raw_event_ts    string    the raw timestamp as a string, for the rejects table
raw_value       string    the raw value as a string, for the rejects table
source_file     string    the file the row came from (``_metadata.file_path``)
malformed       boolean   the reader flagged the record as corrupt (JSON/CSV ``_corrupt_record``)
=============== ========= ==========================================================================
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, IllegalArgumentException
from pyspark.sql import Column, DataFrame, DataFrameReader, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.config import utc_midnight_micros
from mf_spark.errors import ConfigError, InputDataError, error_text, java_cause

log = logging.getLogger(__name__)

#: The canonical event fields; ``columns`` maps each to a raw column name.
EVENT_FIELDS = ("user_id", "item_id", "event_type", "event_ts", "value")
#: Key of ``columns`` naming the Hive partition column (``event_date=YYYY-MM-DD`` directories).
PARTITION_FIELD = "event_date"

_ID_TYPES = (
    T.StringType,
    T.CharType,
    T.VarcharType,
    T.IntegralType,
    T.DecimalType,
    T.FloatType,
    T.DoubleType,
)


@dataclass(frozen=True)
class EventWindow:
    """Event dates ``[start, end]`` (inclusive) of a run; instants are UTC.

    ``start_micros`` is midnight at the start of ``start``; ``end_micros`` is midnight *after* ``end``
    (exclusive), which is also the reference instant of the time decay. Both are microseconds since the
    epoch, compared with ``unix_micros(event_ts)``: a datetime literal is rebased with the JVM's time
    zone before 1900, which moved the window's edges by minutes with the machine's zone.
    """

    start: dt.date
    end: dt.date

    @property
    def start_micros(self) -> int:
        return utc_midnight_micros(self.start)

    @property
    def end_micros(self) -> int:
        return utc_midnight_micros(self.end + dt.timedelta(days=1))


def event_window(run_date: dt.date, lookback_days: int) -> EventWindow:
    """The window ``[run_date - lookback_days + 1, run_date]``."""
    if lookback_days < 1:
        raise ValueError(f"lookback_days must be >= 1, got {lookback_days}")
    return EventWindow(start=run_date - dt.timedelta(days=lookback_days - 1), end=run_date)


def read_raw(
    spark: SparkSession, path: str, input_format: str, options: Mapping[str, str],
    text_columns: Iterable[str] = (),
) -> DataFrame:
    """Read the raw event table lazily.

    ``text_columns`` (the mapped id and event-type columns) are read from CSV and JSON as written, as
    strings, even when ``inferSchema`` or JSON's own inference would guess a number: a guess is made
    afresh from each night's files, so "00123" and "123" became one id, and a night with an id "12.5"
    turned every other id of the column into "17850.0", new to the ID map.

    Raises
    ------
    InputDataError
        When the path does not exist, Spark cannot infer a schema (an empty directory), the files are not
        in ``input.format`` (Parquet read as CSV or JSON, text read as Parquet, no line of a JSON input
        is a JSON record), a CSV/JSON input is empty (no header and no rows), or the first data file
        cannot be opened (e.g. no read permission).
    """
    if "://" not in path and not os.path.exists(path):
        raise InputDataError(f"input path {path} does not exist (input.path)")
    if "://" not in path:
        # Spark reads the wrong format without complaint (CSV of binary garbage, JSON of corrupt records)
        # or fails with a footer trace; one file's magic bytes tell the formats apart before Spark starts.
        _check_format_locally(path, input_format, options)
    reader = spark.read.format(input_format).options(**dict(options))
    df = _load(reader, path, input_format, options)
    _check_schema(df, path, input_format, options)
    schema = _schema_as_written(df.schema, input_format, text_columns)
    corrupt = _corrupt_record_name(options)
    if input_format == "csv" and corrupt not in df.columns:
        # Spark's CSV reader flags a record with too many or too few fields only when the schema has the
        # corrupt-record column; with an inferred schema it cut or padded such rows silently. Reading
        # again with the inferred schema plus that column costs no second inference.
        schema = schema.add(corrupt, T.StringType())
    if schema != df.schema:
        df = reader.schema(schema).load(path)
    return df


def _load(reader: DataFrameReader, path: str, input_format: str, options: Mapping[str, str]) -> DataFrame:
    """``reader.load(path)``, with what Spark cannot make of the files at load time as the input's error."""
    try:
        return reader.load(path)
    except AnalysisException as exc:
        condition = exc.getCondition() or ""
        if condition == "PATH_NOT_FOUND":
            raise InputDataError(f"input path {path} does not exist (input.path)") from None
        if condition.startswith("UNABLE_TO_INFER_SCHEMA"):
            raise InputDataError(f"input path {path} holds no readable {input_format} files") from None
        # Anything else Spark cannot make of the files at load time is the input's problem too
        hint = ""
        if condition == "PARQUET_TYPE_ILLEGAL" and "NANOS" in str(exc):
            hint = (". Nanosecond timestamps (pandas' default) are not read by Spark: write the files with "
                    "microseconds, e.g. df.to_parquet(..., coerce_timestamps='us', allow_truncated_timestamps=True)")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else condition
        raise InputDataError(f"input.path = {path} cannot be read as {input_format}: {first_line}{hint}") from None
    except IllegalArgumentException as exc:
        # A reader option Spark cannot parse (mergeSchema = "maybe"): its message names only the value
        given = ", ".join(f"{k} = {v!r}" for k, v in sorted(dict(options).items()))
        raise ConfigError(f"input.options ({given}): Spark's {input_format} reader refused them: "
                          f"{error_text(exc).strip().splitlines()[0]}") from None
    except Py4JJavaError as exc:
        # Parquet schema inference opens the footers; only this failure is the wrong format
        if input_format == "parquet" and any(m in str(exc) for m in _NOT_PARQUET_MARKERS):
            named = re.search(r"while reading file (\S+?)\.\s", str(exc))
            example = f" (e.g. {named.group(1)})" if named else ""
            detail = f"Spark found files that are not Parquet{example}"
            raise _format_error(path, input_format, detail) from None
        # Listing the input failed in the JVM: an unreachable or malformed URI (hdfs:/// without a
        # name node, no FileSystem for the scheme), permissions. The input, not the job, is wrong.
        raise InputDataError(f"input.path = {path} cannot be read: {java_cause(exc)}") from None


def _schema_as_written(schema: T.StructType, input_format: str, text_columns: Iterable[str]) -> T.StructType:
    """``schema`` with the ``text_columns`` of a CSV or JSON input read as strings where inference guessed
    another type."""
    if input_format not in ("csv", "json"):
        return schema
    # CSV holds only text, so any guess (number, boolean, date) becomes text again; in JSON only
    # numbers do (a JSON boolean, array or object stays what it is and the type check refuses it)
    as_written = {c.lower() for c in text_columns}

    def guessed(dtype: T.DataType) -> bool:
        if input_format == "csv":
            return not isinstance(dtype, T.StringType)
        return isinstance(dtype, T.NumericType)

    return T.StructType([
        T.StructField(f.name, T.StringType(), f.nullable) if f.name.lower() in as_written and guessed(f.dataType)
        else f
        for f in schema.fields
    ])


#: How Spark reports a non-Parquet file met while inferring a Parquet schema.
_NOT_PARQUET_MARKERS = ("CANNOT_READ_FILE_FOOTER", "is not a Parquet file")
_PARQUET_MAGIC = b"PAR1"


def _format_error(path: str, input_format: str, detail: str) -> InputDataError:
    return InputDataError(
        f"input path {path} does not hold {input_format} data (input.format = '{input_format}'): "
        f"{detail}; set input.format to the files' format"
    )


def _spark_ignores(name: str) -> bool:
    # Spark's own listing rule (InMemoryFileIndex): hidden files, _SUCCESS and the like, partial copies
    return (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")


def _first_data_file(path: str, options: Mapping[str, str]) -> str | None:
    """The first non-empty file Spark would read under ``path`` (sorted order), or None."""
    if os.path.isfile(path):
        return path if os.path.getsize(path) > 0 else None
    glob = next((v for k, v in options.items() if k.lower() == "pathglobfilter"), None)
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not _spark_ignores(d))
        for name in sorted(files):
            if _spark_ignores(name) or (glob and not fnmatch.fnmatch(name, glob)):
                continue
            full = os.path.join(root, name)
            if os.path.getsize(full) > 0:
                return full
    return None


def _describe(head: bytes) -> str:
    if head.startswith(_PARQUET_MAGIC):
        return "Parquet"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"{", b"[")):
        return "JSON"
    return "CSV or other text"


def _check_format_locally(path: str, input_format: str, options: Mapping[str, str]) -> None:
    if input_format not in ("parquet", "csv", "json"):
        return
    first = _first_data_file(path, options)
    if first is None:  # nothing to sniff; Spark reports an empty input itself
        return
    try:
        with open(first, "rb") as f:
            head = f.read(64)
    except OSError as exc:  # a traceback (exit 1) after the lock and the run directory were made
        raise InputDataError(f"input file {first} cannot be read: {exc.strerror or exc} (input.path)") from None
    # Every Parquet file starts with PAR1 whatever its codec, and no CSV/JSON file (plain or compressed) does
    found = _describe(head)
    where = f"{first} looks like {found}" if first != path else f"the file looks like {found}"
    if (input_format == "parquet") != (found == "Parquet"):
        raise _format_error(path, input_format, where)
    if input_format == "csv" and found == "JSON":  # a CSV header starting with '{' is not plausible
        raise _format_error(path, input_format, where)


def _data_columns(df: DataFrame, files: list[str]) -> list[str]:
    """The columns of ``df`` read from ``files`` (its input files), without Hive partition columns."""
    return [c for c in df.columns if not (files and f"/{c}=" in files[0])]


def _check_schema(df: DataFrame, path: str, input_format: str, options: Mapping[str, str]) -> None:
    if input_format not in ("csv", "json"):
        return
    files = df.inputFiles()  # one listing for both uses: it walks every input file on the driver
    columns = _data_columns(df, files)
    if not columns:
        if "://" not in path and os.path.isfile(path):
            what = f"input file {path}"
        else:
            what = f"input file {files[0]}" if len(files) == 1 else f"every file under input path {path}"
        content = "no header and no rows" if input_format == "csv" else "no records"
        raise InputDataError(f"{what} is empty: {content} (input.format = '{input_format}', input.path)")
    if input_format == "json":
        if columns == [_corrupt_record_name(options)]:
            raise _format_error(path, input_format, "no line is a JSON record (Parquet or CSV?)")
    elif any(c.startswith(_PARQUET_MAGIC.decode()) for c in columns):  # header of a remote Parquet file
        raise _format_error(path, input_format, "the CSV header is binary: the files look like Parquet")


def partition_column(df: DataFrame, column: str) -> str | None:
    """``column`` if ``df`` is Hive-partitioned by it (``<column>=...`` directories), else None.

    Spark has already listed the files when the DataFrame was created, so ``inputFiles`` costs no I/O.
    """
    if column not in df.columns:
        return None
    marker = f"/{column}="
    return column if any(marker in f for f in df.inputFiles()) else None


_PARTITION_DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d")


def _partition_value_is_date(value: str) -> bool:
    for form in _PARTITION_DATE_FORMATS:
        try:
            dt.datetime.strptime(value, form)
            return True
        except ValueError:
            pass
    return False


def partition_day(df: DataFrame, column: str) -> Column:
    """The partition column as a date: ``YYYY-MM-DD`` or ``yyyyMMdd`` (which Spark infers as an int
    column), null for any other value."""
    dtype = df.schema[column].dataType
    if isinstance(dtype, T.DateType):
        return F.col(column)
    if isinstance(dtype, (T.TimestampType, T.TimestampNTZType)):
        return F.col(column).cast("date")
    text = F.col(column).cast("string")
    return F.coalesce(F.try_to_date(text, "yyyy-MM-dd"), F.try_to_date(text, "yyyyMMdd"))


def prune_to_window(df: DataFrame, column: str, window: EventWindow) -> DataFrame:
    """Keep the partitions whose date lies in the window, and those whose value is not a date.

    The filter touches only the partition column, so Spark turns it into ``PartitionFilters`` and never
    opens files outside the window. A partition whose value is not a date (``__HIVE_DEFAULT_PARTITION__``,
    which Spark writes for null, or a mislabelled directory) cannot be judged by its name: it is read, and
    its rows are kept or rejected by their own ``event_ts`` like an unpartitioned input's, with a warning
    naming the values. Dropping it unread would lose its rows without a count.
    """
    marker = re.compile(rf"/{re.escape(column)}=([^/]*)/")
    odd = sorted({m.group(1) for f in df.inputFiles() for m in [marker.search(f)]
                  if m and not _partition_value_is_date(unquote(m.group(1)))})
    if odd:
        log.warning("input partitions whose %s is not a date are read in full, their rows judged by event_ts: %s",
                    column, ", ".join(f"{column}={v}" for v in odd[:10]) + (" ..." if len(odd) > 10 else ""))
    day = partition_day(df, column)
    return df.filter(day.isNull() | day.between(F.lit(window.start), F.lit(window.end)))


def _corrupt_record_name(options: Mapping[str, str]) -> str:
    return next(
        (v for k, v in options.items() if k.lower() == "columnnameofcorruptrecord"), "_corrupt_record"
    )


def _corrupt_record_column(df: DataFrame, options: Mapping[str, str], mapped: set[str]) -> str | None:
    name = _corrupt_record_name(options)
    return name if name in df.columns and name not in mapped else None


def _type_error(field: str, column: str, dtype: T.DataType, path: str, wanted: str) -> InputDataError:
    return InputDataError(
        f"column '{column}' (input.columns.{field}) in {path} has type {dtype.simpleString()}, "
        f"which cannot be cast to {wanted}"
    )


def _as_id_string(col: Column, dtype: T.DataType, field: str, column: str, path: str) -> Column:
    if isinstance(dtype, (T.FloatType, T.DoubleType)):
        # NaN and inf are missing ids, not the ids "NaN" and "Infinity" shared by unrelated events
        return F.when(~F.isnan(col) & (F.abs(col) != float("inf")), col.cast("string"))
    if isinstance(dtype, T.NullType) or isinstance(dtype, _ID_TYPES):
        return col.cast("string")
    raise _type_error(field, column, dtype, path, "string")


#: Epoch seconds outside [1e8, 1e11) (1973-03-03 to the year 5138) are not epoch seconds: a date written
#: as digits (20240310 read as 1970-08-23, then silently outside the window) or epoch milliseconds (year
#: 55,000, rejected as future with no hint). They are ``unparseable_timestamp``, and the raw value in the
#: rejects table shows which.
EPOCH_SECONDS_RANGE = (1e8, 1e11)


def _from_epoch_seconds(seconds: Column) -> Column:
    low, high = EPOCH_SECONDS_RANGE
    return F.when((seconds >= low) & (seconds < high), seconds.try_cast("timestamp"))


def _as_timestamp(col: Column, dtype: T.DataType, column: str, path: str) -> Column:
    if isinstance(dtype, T.TimestampType):
        return col
    if isinstance(dtype, (T.TimestampNTZType, T.DateType)):
        return col.cast("timestamp")
    if isinstance(dtype, T.NumericType):
        return _from_epoch_seconds(col.cast("double"))
    if isinstance(dtype, (T.StringType, T.CharType, T.VarcharType)):
        # ISO 8601 forms ('2011-12-09', '2011-12-09 08:26:00', '2011-12-09T08:26:00.5+01:00'), else a
        # numeric string of 9+ digits as epoch seconds; try_cast so a bad string becomes a reject, not a
        # failed job. Spark's cast also takes '2024' and '2024-03' (the first day) and the epoch reading
        # made '20240309' a 1970 instant: both are unparseable here rather than silently misdated.
        iso = F.when(col.rlike(r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}"), col.try_cast("timestamp"))
        is_number = col.rlike(r"^\s*-?[0-9]{9,}(\.[0-9]*)?\s*$")
        epoch = F.when(is_number, _from_epoch_seconds(col.try_cast("double")))
        return F.coalesce(iso, epoch)
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("timestamp")
    raise _type_error("event_ts", column, dtype, path, "timestamp")


def _as_double(col: Column, dtype: T.DataType, column: str, path: str) -> Column:
    if isinstance(dtype, T.NumericType):
        return col.cast("double")
    if isinstance(dtype, (T.StringType, T.CharType, T.VarcharType)):
        return col.try_cast("double")
    if isinstance(dtype, T.NullType):
        return F.lit(None).cast("double")
    raise _type_error("value", column, dtype, path, "double")


def to_canonical(
    df: DataFrame,
    columns: Mapping[str, str],
    path: str,
    value_required: bool,
    reader_options: Mapping[str, str] | None = None,
) -> DataFrame:
    """Map, type-check and parse the raw columns into the canonical shape (see the module docstring).

    Parameters
    ----------
    df : DataFrame
        Raw events as read.
    columns : mapping
        Canonical field -> raw column name (``input.columns``); missing fields use their own name.
    path : str
        Input path, named in error messages.
    value_required : bool
        Some event type multiplies by the value, so the value column must exist.
    reader_options : mapping, optional
        Reader options, to find a custom ``columnNameOfCorruptRecord``.

    Raises
    ------
    InputDataError
        A mapped column is missing, or has a type that cannot be cast (names the column and the path).
    """
    raw_names = {field: columns.get(field, field) for field in EVENT_FIELDS}
    dtypes = {f.name: f.dataType for f in df.schema.fields}
    for field, column in raw_names.items():
        if column not in dtypes and not (field == "value" and not value_required):
            raise InputDataError(
                f"column '{column}' (input.columns.{field}) is missing in {path}; "
                f"columns found: {', '.join(df.columns)}"
            )
    if raw_names["value"] not in dtypes:
        log.info("no value column '%s' in %s: every value is null", raw_names["value"], path)

    def raw(field: str) -> Column:
        return F.col(f"`{raw_names[field]}`")

    ids = {
        field: _as_id_string(raw(field), dtypes[raw_names[field]], field, raw_names[field], path)
        for field in ("user_id", "item_id", "event_type")
    }
    ts_type = dtypes[raw_names["event_ts"]]
    event_ts = _as_timestamp(raw("event_ts"), ts_type, raw_names["event_ts"], path)
    if raw_names["value"] in dtypes:
        value_type = dtypes[raw_names["value"]]
        value = _as_double(raw("value"), value_type, raw_names["value"], path)
        raw_value = raw("value").cast("string")
    else:
        value = F.lit(None).cast("double")
        raw_value = F.lit(None).cast("string")
    corrupt = _corrupt_record_column(df, reader_options or {}, set(raw_names.values()))
    malformed = F.col(f"`{corrupt}`").isNotNull() if corrupt else F.lit(False)
    return df.select(
        ids["user_id"].alias("user_id"),
        ids["item_id"].alias("item_id"),
        ids["event_type"].alias("event_type"),
        event_ts.alias("event_ts"),
        value.alias("value"),
        raw("event_ts").cast("string").alias("raw_event_ts"),
        raw_value.alias("raw_value"),
        F.col("_metadata.file_path").alias("source_file"),
        malformed.alias("malformed"),
    )
