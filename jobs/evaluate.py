"""Offline evaluation: split the interactions, train and compare the configured models, write a report.

    ./spark-submit.sh jobs/evaluate.py --config conf/local.toml --date 2011-12-09
    ./spark-submit.sh jobs/evaluate.py --config conf/local.toml --date 2011-12-09 --tune \\
        --set 'evaluate.models=["implicit_als","mllib_als","popular","random"]'

Without --interactions it evaluates the interactions of the run published for --date. The report
(metrics.json, report.md, PNG plots) goes to --out or <output.root>/evaluations/dt=<date>/<evaluation id>
(a UTC time and a random suffix, made like a run id).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from mf_spark.cli import non_empty, parse_date, run_job

if TYPE_CHECKING:  # the session comes from cli.run_job; pyspark loads only when it starts
    from pyspark.sql import SparkSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--date", type=parse_date, required=True, help="run date whose interactions are evaluated"
    )
    parser.add_argument(
        "--interactions",
        type=non_empty,
        help="Parquet interactions (user_idx, item_idx, strength, first_ts or last_ts) instead",
    )
    parser.add_argument(
        "--tune", action="store_true", help="search [evaluate.tuning] per model on a validation split"
    )
    parser.add_argument("--out", type=non_empty, help="report directory (default under output.root/evaluations)")


def validate(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    """Settings and the input table, before Spark starts: a wrong path should not cost a cluster start-up."""
    from mf_spark.evaluate.holdout import published_interactions_path, validate_settings
    from mf_spark.pipeline import require_local_path

    validate_settings(cfg["evaluate"], tune=args.tune)
    if args.out:
        from mf_spark.evaluate.report import check_report_dir

        check_report_dir(args.out)
    if args.interactions:
        require_local_path(args.interactions, f"evaluate: --interactions {args.interactions} does not exist")
        args.interactions_path = args.interactions
    else:
        args.interactions_path = published_interactions_path(cfg["output"]["root"], args.date)
        logging.getLogger("mf_spark").info("evaluate: the interactions of the run published for %s: %s",
                                           args.date, args.interactions_path)


def body(spark: SparkSession, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from mf_spark.evaluate.holdout import evaluate_holdout, holdout_settings_from, report_dir
    from mf_spark.evaluate.report import console_summary
    from mf_spark.publish import provenance
    from mf_spark.tables import INTERACTION_COLUMNS, read_parquet_table

    path = args.interactions_path
    out = args.out or report_dir(cfg["output"]["root"], args.date)
    result = evaluate_holdout(
        spark, read_parquet_table(spark, path, "evaluate: interactions", INTERACTION_COLUMNS), out_dir=out,
        source=provenance(interactions=path, run_date=args.date.isoformat()),
        **holdout_settings_from(cfg, tune=args.tune),
    )
    gate = cfg["evaluate"]["gate"]
    print(console_summary(result, gate["metric"] if gate["enabled"] else None, gate["min_value"]))
    print(f"report: {out}/report.md")


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-evaluate", __doc__, body, add_arguments, validate_args=validate))
