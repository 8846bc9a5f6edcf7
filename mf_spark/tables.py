"""Reading a Parquet table named on the command line, by a config key or found in a run directory, with
errors naming it.

Spark's own errors for a table that is there but wrong (an empty directory, files that are not Parquet, a
rejects table given as interactions) are analysis traces that surface far from the flag that named it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession

from mf_spark.errors import InputDataError, java_cause

#: The columns every stage after ingest reads from an interaction table.
INTERACTION_COLUMNS = ("user_idx", "item_idx", "strength")


def read_parquet_table(spark: SparkSession, path: str, what: str, required: Sequence[str] = ()) -> DataFrame:
    """``path`` read as Parquet, checked to hold the ``required`` columns.

    Parameters
    ----------
    path : str
        A local path or a URI.
    what : str
        Names the table in messages, with the flag or stage that gave it (``"train: interactions"``).
    required : sequence of str
        Columns the caller reads.

    Raises
    ------
    InputDataError
        When the (local) path does not exist, holds no Parquet files, Spark cannot read its schema as
        Parquet (it reads one file's footer), or the table lacks a required column; the message names
        ``what``, ``path`` and the column.
    """
    if "://" not in path and not os.path.exists(path):
        raise InputDataError(f"{what} {path} does not exist")
    try:
        table = spark.read.parquet(path)
    except AnalysisException as exc:
        if (exc.getCondition() or "").startswith("UNABLE_TO_INFER_SCHEMA"):
            raise InputDataError(f"{what} {path}: holds no Parquet files") from None
        raise InputDataError(f"{what} {path}: cannot be read as Parquet: {java_cause(exc)}") from None
    except Py4JJavaError as exc:  # a footer that is not Parquet's, an unreachable URI
        raise InputDataError(f"{what} {path}: cannot be read as Parquet: {java_cause(exc)}") from None
    require_columns(table, f"{what} {path}", required)
    return table


def require_columns(table: DataFrame, name: str, required: Sequence[str]) -> None:
    """Raise :class:`InputDataError` naming ``name`` and every ``required`` column ``table`` lacks."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputDataError(f"{name}: table has no column {', '.join(repr(c) for c in missing)} "
                             f"(columns: {', '.join(table.columns)})")
