"""Nightly batch: ingest -> train -> recommend -> evaluate (gate) -> publish.

    ./spark-submit.sh jobs/nightly.py --config conf/local.toml --date 2011-12-09
    ./spark-submit.sh jobs/nightly.py --config conf/local.toml --from 2011-12-01 --to 2011-12-09   # backfill
"""

from __future__ import annotations

import sys

from mf_spark.cli import parse_date, run_job


def add_arguments(parser):
    parser.add_argument("--date", type=parse_date, help="run date D: the window ends on D")
    parser.add_argument("--from", dest="start", type=parse_date, help="backfill: first date")
    parser.add_argument("--to", dest="end", type=parse_date, help="backfill: last date")
    parser.add_argument("--break-stale-lock", action="store_true", help="break a lock whose owner process is gone")


def check_dates(args, cfg):
    from mf_spark.errors import ConfigError

    if bool(args.date) == bool(args.start or args.end) or bool(args.start) != bool(args.end):
        raise ConfigError("give either --date D or both --from D1 --to D2")
    if cfg["evaluate"]["enabled"]:
        from mf_spark.evaluate.holdout import validate_settings

        validate_settings(cfg["evaluate"])


def body(spark, cfg, args):
    from mf_spark.pipeline import run_backfill, run_nightly

    if args.date:
        run_nightly(spark, cfg, args.date, break_stale_lock=args.break_stale_lock)
    else:
        run_backfill(spark, cfg, args.start, args.end, break_stale_lock=args.break_stale_lock)


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-nightly", __doc__, body, add_arguments, validate_args=check_dates))
