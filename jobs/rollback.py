"""Point latest.json at an older published run, or list the runs under output.root.

    .venv/bin/python jobs/rollback.py --config conf/local.toml --list
    .venv/bin/python jobs/rollback.py --config conf/local.toml --date 2011-12-08   # that date's newest run
    .venv/bin/python jobs/rollback.py --config conf/local.toml --to 20111209T031502123456Z-a1b2c3

Any Python with mf_spark installed will do (`make venv` makes .venv/bin/python one).
No Spark is started: this only rewrites latest.json (atomically, holding the output root's lock).
Nothing is deleted; the next nightly publishes as usual and moves latest.json forward again.
An output.root that does not exist is a configuration error (exit 2): nothing is created there.
"""

from __future__ import annotations

import datetime as dt
import sys

from mf_spark.cli import base_parser, non_empty, parse_date, setup_logging
from mf_spark.config import key_source, load_config
from mf_spark.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", type=non_empty, metavar="RUN_ID", help="run id to publish again")
    target.add_argument("--date", type=parse_date, metavar="YYYY-MM-DD",
                        help="publish that date's newest published run")
    target.add_argument("--list", action="store_true", help="list the runs and their status")
    parser.add_argument("--break-stale-lock", action="store_true", help="break a lock whose owner process is gone")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    from mf_spark import publish

    try:
        cfg = load_config(args.config, args.overrides)
        root = cfg["output"]["root"]
        # Before the lock: taking it would create a mistyped root, and --list would call it "no runs".
        publish.check_output_root(root, key_source(cfg, "output.root"))
        if args.list:
            print(publish.format_runs(publish.list_runs(root)))
            return 0
        publish.check_writable_root(root, key_source(cfg, "output.root"))
        with publish.RunLock(root, dt.date.today(), break_stale=args.break_stale_lock, purpose="rollback"):
            entry = publish.rollback(root, args.to or args.date.isoformat())
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"latest.json now names {entry['path']} (run date {entry['run_date']}, was {entry['rolled_back_from']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
