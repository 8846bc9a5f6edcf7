"""Nightly batch: ingest -> train -> recommend -> evaluate (gate) -> publish.

    ./spark-submit.sh jobs/nightly.py --config conf/local.toml --date 2011-12-09
    ./spark-submit.sh jobs/nightly.py --config conf/local.toml --from 2011-12-01 --to 2011-12-09   # backfill

A backfill stops at the first failing date. With --skip-empty-days (backfill only) it passes over dates
whose window holds no event, logs each, lists them at the end and goes on; any other failure still stops it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mf_spark.cli import check_not_future, parse_date, run_job

if TYPE_CHECKING:  # the session comes from cli.run_job; pyspark loads only when it starts
    from pyspark.sql import SparkSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=parse_date, help="run date D: the window ends on D")
    parser.add_argument("--from", dest="start", type=parse_date, help="backfill: first date")
    parser.add_argument("--to", dest="end", type=parse_date, help="backfill: last date")
    parser.add_argument("--skip-empty-days", action="store_true",
                        help="backfill only: pass over dates with no events in their window, do not stop")
    parser.add_argument("--break-stale-lock", action="store_true",
                        help="break a lock whose owner process is gone")


def check_dates(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    """Before Spark starts, nothing created: refuse a bad date range or flag (exit 2), a missing local
    input (exit 3), a root another run holds (exit 6) or a corrupt latest.json (exit 7)."""
    from mf_spark.errors import UsageError

    if bool(args.date) == bool(args.start or args.end) or bool(args.start) != bool(args.end):
        raise UsageError("give either --date D or both --from D1 --to D2")
    if args.start and args.end < args.start:
        raise UsageError(f"--from {args.start} is after --to {args.end}: the backfill runs from the earlier "
                          "date to the later one")
    check_not_future(max(d for d in (args.date, args.end) if d),
                     "a published future date would keep latest.json from moving")
    if args.date and args.skip_empty_days:
        # A single date with no events must fail (exit 3): skipping it would exit 0 with nothing published.
        raise UsageError("--skip-empty-days applies only to a backfill (--from D1 --to D2), not to --date")
    if cfg["evaluate"]["enabled"]:
        from mf_spark.evaluate.holdout import validate_settings

        validate_settings(cfg["evaluate"])
    from mf_spark.pipeline import check_before_writing
    from mf_spark.publish import check_latest

    check_before_writing(cfg, args.date or args.start, break_stale_lock=args.break_stale_lock)
    check_latest(cfg["output"]["root"])


def body(spark: SparkSession, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from mf_spark.pipeline import run_backfill, run_nightly

    if args.date:
        run_nightly(spark, cfg, args.date, break_stale_lock=args.break_stale_lock)
    else:
        run_backfill(spark, cfg, args.start, args.end, break_stale_lock=args.break_stale_lock,
                     skip_empty_days=args.skip_empty_days)


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-nightly", __doc__, body, add_arguments, validate_args=check_dates))
