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

import datetime as dt
import logging
import os
import re
import sys

from mf_spark.cli import non_empty, parse_date, run_job


def add_arguments(parser):
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


def locked_root(args, cfg):
    """output.root when RUN_DIR lies inside it: the job then holds the root's lock, so a nightly's
    retention cannot delete the run it is rewriting (and a rollback cannot race it)."""
    root = os.path.realpath(cfg["output"]["root"])
    run_dir = os.path.realpath(args.run_dir)
    return cfg["output"]["root"] if os.path.commonpath([root, run_dir]) == root else None


def check_paths(args, cfg):
    from mf_spark.errors import UsageError

    if args.model and not args.interactions:
        raise UsageError("--model needs --interactions (the history whose items are excluded and folded in)")
    # The date selects nothing (the run directory does); a different dt= in the path is a mix-up.
    in_path = re.search(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?:/|$)", args.run_dir)
    if args.date and in_path and in_path.group(1) != args.date.isoformat():
        raise UsageError(f"--date {args.date} but --run-dir is a run of {in_path.group(1)}; the run directory "
                         "decides what is read, --date only labels the log")
    args.date = args.date or (in_path.group(1) if in_path else "not given")
    args.lock_date = dt.date.fromisoformat(str(args.date)) if args.date != "not given" else dt.date.today()
    from mf_spark.pipeline import check_local_inputs, require_local_path
    from mf_spark.publish import unwritable_reason

    if "://" in args.run_dir:
        # Its tables are swapped in with rename(2), like output.root's (docs/operations.md, Storage).
        raise UsageError(f"--run-dir {args.run_dir}: must be a local (POSIX) path, not a URL")
    reason = unwritable_reason(args.run_dir) if args.model else None
    if reason:
        raise UsageError(f"--run-dir {args.run_dir} cannot be written: {reason}")
    check_local_inputs(cfg, events=False)
    for flag, path in (("--model", args.model), ("--interactions", args.interactions),
                       ("--run-dir", None if args.model else args.run_dir)):
        require_local_path(path, f"recommend: {flag} {path} does not exist")
    root = locked_root(args, cfg)
    if root:
        from mf_spark.publish import RunLock

        RunLock(root, args.lock_date, break_stale=args.break_stale_lock).check_free()


def body(spark, cfg, args):
    from contextlib import nullcontext

    from mf_spark.pipeline import recommend_settings_from
    from mf_spark.publish import RunLock
    from mf_spark.recommend import run_recommend_stage

    logging.getLogger("mf_spark").info("recommend: run date %s, run directory %s", args.date, args.run_dir)
    root = locked_root(args, cfg)
    lock = (RunLock(root, args.lock_date, break_stale=args.break_stale_lock, purpose="recommend") if root
            else nullcontext())
    with lock:
        run_recommend_stage(
            spark, args.run_dir, recommend_settings_from(cfg),
            id_map_dir=os.path.join(cfg["output"]["root"], "id_maps"),
            item_filter_path=cfg["recommend"]["item_filter_path"],
            allow_list_path=cfg["recommend"]["allow_list_path"],
            model_dir=args.model, interactions_path=args.interactions,
        )


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-recommend", __doc__, body, add_arguments, validate_args=check_paths))
