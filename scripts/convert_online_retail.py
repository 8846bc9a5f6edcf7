#!/usr/bin/env python3
"""Convert the UCI Online Retail log (by-day CSV split) into the project's raw event schema.

Writes zstd Parquet, Hive-partitioned by ``event_date=YYYY-MM-DD``, one file per day, to
``data/sample/events`` by default. pandas/pyarrow only, so it runs in seconds without a JVM::

    .venv/bin/python scripts/convert_online_retail.py \
        --source ../shared/data/online-retail/by-day --dest data/sample/events

Rows without a CustomerID (anonymous checkouts) are dropped; everything else is kept as is,
including negative quantities and non-product stock codes (POST, M, D, ...): the ingest stage
decides about those.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mf_spark.errors import InputDataError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "online-retail" / "by-day"
DEFAULT_DEST = REPO_ROOT / "data" / "sample" / "events"

SOURCE_COLUMNS = ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "CustomerID", "Country")
SOURCE_TS_FORMAT = "%Y-%m-%d %H:%M:%S"

# Timezone-aware UTC timestamps are written with isAdjustedToUTC=true, which Spark reads as
# TimestampType (a naive pandas column would come back as TimestampNTZ).
EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("event_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("invoice_no", pa.string(), nullable=False),
        pa.field("country", pa.string(), nullable=False),
    ]
)
SORT_KEYS = ["event_ts", "invoice_no", "item_id", "value"]
PARTITION_COLUMN = "event_date"
PART_FILE_NAME = "part-00000.zstd.parquet"
ZSTD_LEVEL = 9

_TRAILING_FLOAT_ZERO = re.compile(r"\.0+$")


@dataclass(frozen=True)
class ConversionSummary:
    """What one conversion read and wrote."""

    rows_read: int
    rows_dropped_no_customer: int
    rows_written: int
    days: int
    users: int
    items: int
    bytes_written: int

    def lines(self) -> list[str]:
        return [
            f"rows read:                  {self.rows_read:>9,}",
            f"rows dropped (no customer): {self.rows_dropped_no_customer:>9,}",
            f"rows written:               {self.rows_written:>9,}",
            f"days (partitions):          {self.days:>9,}",
            f"distinct users:             {self.users:>9,}",
            f"distinct items:             {self.items:>9,}",
            f"bytes written:              {self.bytes_written:>9,}",
        ]


def _customer_id_as_string(customer_id: pd.Series) -> pd.Series:
    """'17850.0' (or the float 17850.0) -> '17850'; blank or null -> null."""
    text = customer_id.astype("string").str.strip()
    text = text.str.replace(_TRAILING_FLOAT_ZERO, "", regex=True)
    return text.mask(text == "")


def convert_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Turn Online Retail invoice lines into raw events.

    Parameters
    ----------
    raw : pandas.DataFrame
        One row per invoice line with at least the columns InvoiceNo, StockCode, Quantity,
        InvoiceDate ('YYYY-MM-DD HH:MM:SS', UK wall-clock time), CustomerID (string such as
        '17850.0' or float; null or blank = anonymous) and Country. Other columns are ignored.

    Returns
    -------
    pandas.DataFrame
        One row per invoice line with a CustomerID, columns in :data:`EVENT_SCHEMA` order:
        user_id, item_id, event_type ('purchase', or 'return' for invoices starting with 'C'),
        event_ts (datetime64[us, UTC] holding the source wall-clock value), value (Quantity as
        float64, sign kept), invoice_no, country; sorted by event_ts, invoice_no, item_id, value,
        with a fresh RangeIndex.

    Raises
    ------
    InputDataError
        When a column is missing or an InvoiceDate or Quantity does not parse.
    """
    missing = [c for c in SOURCE_COLUMNS if c not in raw.columns]
    if missing:
        raise InputDataError(f"Online Retail source lacks column(s) {', '.join(missing)}")

    user_id = _customer_id_as_string(raw["CustomerID"])
    has_customer = user_id.notna().to_numpy()
    known = raw.loc[has_customer]
    user_id = user_id.loc[has_customer]

    try:
        event_ts = pd.to_datetime(known["InvoiceDate"].astype(str).str.strip(), format=SOURCE_TS_FORMAT)
    except ValueError as exc:
        raise InputDataError(f"column InvoiceDate: expected '{SOURCE_TS_FORMAT}': {exc}") from None
    try:
        value = pd.to_numeric(known["Quantity"], errors="raise").astype("float64")
    except (ValueError, TypeError) as exc:
        raise InputDataError(f"column Quantity: not a number: {exc}") from None

    invoice_no = known["InvoiceNo"].astype(str).str.strip()
    events = pd.DataFrame(
        {
            "user_id": user_id.astype(object),
            "item_id": known["StockCode"].astype(str).str.strip(),
            "event_type": invoice_no.str.startswith("C").map({True: "return", False: "purchase"}),
            "event_ts": event_ts.astype("datetime64[us]").dt.tz_localize("UTC"),
            "value": value,
            "invoice_no": invoice_no,
            "country": known["Country"].astype(str).str.strip(),
        }
    )
    return events.sort_values(SORT_KEYS, kind="mergesort").reset_index(drop=True)


def read_source(source: Path, days: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the by-day CSVs (all, or the named ``YYYY-MM-DD`` days) in file-name order, as strings."""
    if not source.is_dir():
        raise InputDataError(f"source directory {source} not found")
    if days is None:
        paths = sorted(source.glob("*.csv"))
    else:
        paths = [source / f"{day}.csv" for day in sorted(days)]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise InputDataError(f"source file(s) not found: {', '.join(absent)}")
    if not paths:
        raise InputDataError(f"no *.csv files in {source}")
    # keep_default_na=False so ids such as 'NA' stay strings; only empty fields become null.
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""]) for p in paths]
    return pd.concat(frames, ignore_index=True)


def write_partitions(events: pd.DataFrame, dest: Path) -> int:
    """Write ``events`` (as returned by :func:`convert_frame`) as one zstd Parquet file per event date.

    Existing ``event_date=*`` directories under ``dest`` are removed first, so a rerun leaves no stale
    day behind. The partition column lives only in the directory name. Returns the bytes written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(f"{PARTITION_COLUMN}=*"):
        shutil.rmtree(stale)
    event_date = events["event_ts"].dt.strftime("%Y-%m-%d")
    bytes_written = 0
    for day, day_events in events.groupby(event_date, sort=True):
        table = pa.Table.from_pandas(day_events, schema=EVENT_SCHEMA, preserve_index=False)
        # Drop the pandas metadata: it records the pandas version, which is not the data's business.
        table = table.replace_schema_metadata(None)
        part_dir = dest / f"{PARTITION_COLUMN}={day}"
        part_dir.mkdir()
        path = part_dir / PART_FILE_NAME
        pq.write_table(
            table,
            path,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            row_group_size=max(len(table), 1),
        )
        bytes_written += path.stat().st_size
    return bytes_written


def convert_directory(source: Path, dest: Path, days: Sequence[str] | None = None) -> ConversionSummary:
    """Read the by-day CSVs under ``source`` (optionally only ``days``), convert, write to ``dest``."""
    raw = read_source(source, days)
    events = convert_frame(raw)
    bytes_written = write_partitions(events, dest)
    return ConversionSummary(
        rows_read=len(raw),
        rows_dropped_no_customer=len(raw) - len(events),
        rows_written=len(events),
        days=events["event_ts"].dt.date.nunique(),
        users=events["user_id"].nunique(),
        items=events["item_id"].nunique(),
        bytes_written=bytes_written,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help=f"by-day CSV directory (default {DEFAULT_SOURCE})"
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"output directory (default {DEFAULT_DEST})"
    )
    args = parser.parse_args(argv)
    try:
        summary = convert_directory(args.source, args.dest)
    except InputDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.source} -> {args.dest}")
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
