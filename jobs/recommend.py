"""Top-N recommendations and similar items of a trained run, written as Parquet with string ids.

    ./spark-submit.sh jobs/recommend.py --config conf/local.toml --date 2011-12-09 \
        --run-dir output/local/runs/<run>

Reads ``RUN_DIR/user_factors``, ``RUN_DIR/item_factors``, ``RUN_DIR/interactions`` and the id maps
(``RUN_DIR/dim_user``, ``RUN_DIR/dim_item``, else ``output.root/id_maps/``); writes
``RUN_DIR/recommendations`` and ``RUN_DIR/similar_items``.
"""

from __future__ import annotations

import logging
import os
import sys

from mf_spark.cli import parse_date, run_job


def add_arguments(parser):
    parser.add_argument("--date", type=parse_date, required=True, help="run date D (for the log)")
    parser.add_argument("--run-dir", required=True, help="run directory holding the factors and interactions")


def settings_from_config(cfg):
    from mf_spark.als.params import SolveParams
    from mf_spark.recommend import RecommendSettings

    rec, train = cfg["recommend"], cfg["train"]
    return RecommendSettings(
        top_n=rec["top_n"], similar_n=rec["similar_n"], exclude_seen=rec["exclude_seen"],
        fold_in_new_users=rec["fold_in_new_users"], user_block_size=rec["user_block_size"],
        item_chunk_size=rec["item_chunk_size"], max_broadcast_bytes=rec["broadcast_max_mb"] * 2**20,
        solve_params=SolveParams(
            alpha=train["alpha"], reg_param=train["reg_param"], regularization=train["regularization"],
            confidence=train["confidence"], confidence_epsilon=train["confidence_epsilon"],
            frequency_alpha0=train["frequency_alpha0"], frequency_nu=train["frequency_nu"], solver="cholesky",
        ),
    )


def body(spark, cfg, args):
    from mf_spark.recommend import run_recommend_stage

    logging.getLogger("mf_spark").info("recommend: run date %s, run directory %s", args.date, args.run_dir)
    run_recommend_stage(
        spark, args.run_dir, settings_from_config(cfg),
        id_map_dir=os.path.join(cfg["output"]["root"], "id_maps"),
        item_filter_path=cfg["recommend"]["item_filter_path"],
        allow_list_path=cfg["recommend"]["allow_list_path"],
    )


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-recommend", __doc__, body, add_arguments))
