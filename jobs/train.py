"""Train ImplicitALS on an interaction table and save the model (MLlib's layout).

    ./spark-submit.sh jobs/train.py --config conf/local.toml \\
        --interactions output/local/ingest/dt=2011-12-09/interactions --model-out output/model

The model directory holds ``metadata/``, ``userFactors/`` and ``itemFactors/``;
``ImplicitALSModel.load(DIR)`` reads it and ``jobs/recommend.py --model DIR`` scores it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mf_spark.cli import non_empty, run_job

if TYPE_CHECKING:  # the session comes from cli.run_job; pyspark loads only when it starts
    from pyspark.sql import SparkSession


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", required=True, type=non_empty, help="Parquet: user_idx, item_idx, strength")
    parser.add_argument("--model-out", required=True, type=non_empty, help="directory to save the ImplicitALSModel to (a new "
                        "directory, or a model saved before, which is replaced once the new one is written)")


def check_paths(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from mf_spark.pipeline import check_model_out, require_local_path

    require_local_path(args.interactions, f"train: interactions {args.interactions} does not exist")
    check_model_out(args.model_out)


def body(spark: SparkSession, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from mf_spark.pipeline import train_and_save

    train_and_save(spark, cfg["train"], args.interactions, args.model_out)


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-train", __doc__, body, add_arguments, validate_args=check_paths))
