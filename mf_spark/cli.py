"""Command-line plumbing shared by the thin entry points in ``jobs/``.

Each job is ``run_job(name, add_arguments, body)``: parse arguments, load and validate the config and
the job's own arguments (before a SparkSession is built, so mistakes cost seconds, not a cluster
start-up), build the session, call ``body(spark, cfg, args)`` and turn known errors into a one-line
message and an exit code (see :mod:`mf_spark.errors`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mf_spark.config import load_config, spark_properties
from mf_spark.errors import ConfigError, PipelineError

log = logging.getLogger("mf_spark")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date in YYYY-MM-DD form: {text!r}") from None


def base_parser(description: str) -> argparse.ArgumentParser:
    # Raw: the job docstrings are command examples, which argparse's default formatter runs together.
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML config file, e.g. conf/local.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="Python log level (default INFO)")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)


def run_job(
    app_name: str,
    description: str,
    body: Callable[[Any, dict[str, Any], argparse.Namespace], int | None],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    validate_args: Callable[[argparse.Namespace, dict[str, Any]], None] | None = None,
) -> int:
    """Run one job; returns the process exit code."""
    parser = base_parser(description)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        if validate_args:
            validate_args(args, cfg)
    except ConfigError as exc:
        # Checks across keys (gate metric vs ks, models) know the key, not the file it came from.
        where = "" if args.config in str(exc) else f"{cfg.get('_source', args.config)}: "
        print(f"config error: {where}{exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:  # e.g. an input path given on the command line that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from mf_spark.session import build_session  # imported late: config errors never wait for pyspark

    spark = build_session(app_name, spark_properties(cfg))
    try:
        code = body(spark, cfg, args)
        return int(code or 0)
    except PipelineError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        spark.stop()
