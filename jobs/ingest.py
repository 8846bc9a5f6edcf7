"""Ingest only: raw events -> interactions and rejects for one date, plus the ID maps (standalone run).

    ./spark-submit.sh jobs/ingest.py --config conf/local.toml --date 2011-12-09

Writes Parquet ``<output.root>/ingest/dt=D/interactions`` and ``.../rejects`` and the JSON report
``.../report.json``, updates ``<output.root>/id_maps`` and prints the report table. The nightly does not
use this job: it calls the same library function, ``mf_spark.ingest.run_ingest``. Like the nightly, the
job holds the output root's lock (``_LOCK``) while it writes. Exit codes: 2 for a usage or config
error (a run date after tomorrow, an output root that cannot be written), 3 for bad input (missing path
or column, uncastable type, a damaged event file, a missing or damaged ID-map version, no events, no
interaction left; in that last case the rejects and the report are still written, to see why), 4 when
too many rows are rejected, 6 when another run holds the lock, 8 when a disk is full.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mf_spark.cli import check_not_future, parse_date, run_job

if TYPE_CHECKING:  # the session comes from cli.run_job; pyspark loads only when it starts
    from pyspark.sql import SparkSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=parse_date, required=True, help="run date D: the window ends on D")
    parser.add_argument(
        "--break-stale-lock", action="store_true", help="break a lock whose owner process is gone"
    )


def check_before_spark(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from mf_spark.pipeline import check_before_writing

    check_not_future(args.date, "its window holds no event yet; check --date")
    check_before_writing(cfg, args.date, break_stale_lock=args.break_stale_lock, item_tables=False)


def body(spark: SparkSession, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from mf_spark.ingest import format_report_table
    from mf_spark.ingest.stage import ingest_job_output_dir, run_ingest_job

    report = run_ingest_job(spark, cfg, args.date, break_stale_lock=args.break_stale_lock)
    print(format_report_table(report))
    out = ingest_job_output_dir(cfg["output"]["root"], args.date)
    print(f"written: {out}/interactions, {out}/rejects, {out}/report.json")


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-ingest", __doc__, body, add_arguments, validate_args=check_before_spark))
