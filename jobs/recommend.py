"""Top-N recommendations and similar items of a trained run, written as Parquet with string ids.

    ./spark-submit.sh jobs/recommend.py --config conf/local.toml \\
        --run-dir output/local/runs/dt=2011-12-09/run_id=<run id>
    ./spark-submit.sh jobs/recommend.py --config conf/local.toml --date 2011-12-09 \\
        --model output/model --interactions output/local/ingest/dt=2011-12-09/interactions \\
        --run-dir output/recommendations

Reads ``RUN_DIR/user_factors``, ``RUN_DIR/item_factors``, ``RUN_DIR/interactions`` and the id maps
(``RUN_DIR/dim_user``, ``RUN_DIR/dim_item``, else ``output.root/id_maps/``); writes
``RUN_DIR/recommendations`` and ``RUN_DIR/similar_items``. With ``--model`` (a model saved by
jobs/train.py) and ``--interactions`` (e.g. the ingest job's table) the factors and the history come
from there and RUN_DIR only receives the two tables. ``--date`` only labels the log (by default the
``dt=`` of RUN_DIR); a --date that contradicts RUN_DIR's ``dt=`` is refused. When RUN_DIR lies inside
``output.root`` the job holds the root's lock (exit 6 while a nightly runs; ``--break-stale-lock`` as
for the nightly), so retention cannot delete the run it rewrites.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mf_spark.cli import non_empty, parse_date, run_job

if TYPE_CHECKING:  # the session comes from cli.run_job; pyspark loads only when it starts
    from pyspark.sql import SparkSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=parse_date,
                        help="run date D, for the log only; checked against the dt=D of --run-dir when it has one")
    parser.add_argument("--run-dir", required=True, type=non_empty, help="run directory holding the factors and interactions "
                        "(with --model: where the tables are written)")
    parser.add_argument("--model", type=non_empty, help="model directory saved by jobs/train.py, instead of RUN_DIR's factors")
    parser.add_argument("--interactions", type=non_empty, help="interaction table (user_idx, item_idx, strength) instead of "
                        "RUN_DIR/interactions; needed with --model")
    parser.add_argument("--break-stale-lock", action="store_true",
                        help="break the output root's lock if its holder on this host is gone "
                        "(RUN_DIR in output.root)")


def check_paths(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from mf_spark.pipeline import check_recommend_job

    args.job = check_recommend_job(cfg, args.run_dir, date=args.date, model_dir=args.model,
                                   interactions_path=args.interactions, break_stale_lock=args.break_stale_lock)


def body(spark: SparkSession, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from mf_spark.pipeline import run_recommend_job

    run_recommend_job(spark, cfg, args.job)


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-recommend", __doc__, body, add_arguments, validate_args=check_paths))
