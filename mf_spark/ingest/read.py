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
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.errors import InputDataError

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

    ``start_ts`` is midnight at the start of ``start``; ``end_ts`` is midnight *after* ``end`` (exclusive),
    which is also the reference instant of the time decay.
    """

    start: dt.date
    end: dt.date

    @property
    def start_ts(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time(), tzinfo=dt.UTC)

    @property
    def end_ts(self) -> dt.datetime:
        return dt.datetime.combine(self.end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def event_window(run_date: dt.date, lookback_days: int) -> EventWindow:
    """The window ``[run_date - lookback_days + 1, run_date]``."""
    if lookback_days < 1:
        raise ValueError(f"lookback_days must be >= 1, got {lookback_days}")
    return EventWindow(start=run_date - dt.timedelta(days=lookback_days - 1), end=run_date)


def read_raw(spark: SparkSession, path: str, input_format: str, options: Mapping[str, str]) -> DataFrame:
    """Read the raw event table lazily.

    Raises
    ------
    InputDataError
        When the path does not exist or Spark cannot infer a schema (an empty directory).
    """
    if "://" not in path and not os.path.exists(path):
        raise InputDataError(f"input path {path} does not exist (input.path)")
    reader = spark.read.format(input_format).options(**dict(options))
    try:
        return reader.load(path)
    except AnalysisException as exc:
        condition = exc.getCondition() or ""
        if condition == "PATH_NOT_FOUND":
            raise InputDataError(f"input path {path} does not exist (input.path)") from None
        if condition.startswith("UNABLE_TO_INFER_SCHEMA"):
            raise InputDataError(f"input path {path} holds no readable {input_format} files") from None
        raise


def partition_column(df: DataFrame, column: str) -> str | None:
    """``column`` if ``df`` is Hive-partitioned by it (``<column>=...`` directories), else None.

    Spark has already listed the files when the DataFrame was created, so ``inputFiles`` costs no I/O.
    """
    if column not in df.columns:
        return None
    marker = f"/{column}="
    return column if any(marker in f for f in df.inputFiles()) else None


def prune_to_window(df: DataFrame, column: str, window: EventWindow) -> DataFrame:
    """Keep the partitions whose date lies in the window.

    The filter touches only the partition column, so Spark turns it into ``PartitionFilters`` and never
    opens files outside the window. A partition value that is not a date (or ``__HIVE_DEFAULT_PARTITION__``)
    is outside every window.
    """
    day = F.col(column).try_cast("date")
    return df.filter(day.between(F.lit(window.start), F.lit(window.end)))


def _corrupt_record_column(df: DataFrame, options: Mapping[str, str], mapped: set[str]) -> str | None:
    name = next(
        (v for k, v in options.items() if k.lower() == "columnnameofcorruptrecord"), "_corrupt_record"
    )
    return name if name in df.columns and name not in mapped else None


def _type_error(field: str, column: str, dtype: T.DataType, path: str, wanted: str) -> InputDataError:
    return InputDataError(
        f"column '{column}' (input.columns.{field}) in {path} has type {dtype.simpleString()}, "
        f"which cannot be cast to {wanted}"
    )


def _as_id_string(col: Column, dtype: T.DataType, field: str, column: str, path: str) -> Column:
    if isinstance(dtype, T.NullType) or isinstance(dtype, _ID_TYPES):
        return col.cast("string")
    raise _type_error(field, column, dtype, path, "string")


def _as_timestamp(col: Column, dtype: T.DataType, column: str, path: str) -> Column:
    if isinstance(dtype, T.TimestampType):
        return col
    if isinstance(dtype, (T.TimestampNTZType, T.DateType)):
        return col.cast("timestamp")
    if isinstance(dtype, T.NumericType):  # epoch seconds; out-of-range values become null
        return col.cast("double").try_cast("timestamp")
    if isinstance(dtype, (T.StringType, T.CharType, T.VarcharType)):
        # ISO 8601 forms ('2011-12-09', '2011-12-09 08:26:00', '2011-12-09T08:26:00.5+01:00'), else a
        # numeric string as epoch seconds; try_cast so a bad string becomes a reject, not a failed job.
        return F.coalesce(col.try_cast("timestamp"), col.try_cast("double").try_cast("timestamp"))
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
