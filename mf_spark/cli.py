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
import time
from collections.abc import Callable, Sequence
from typing import Any

from mf_spark.config import key_source, load_config, parse_iso_date, spark_properties
from mf_spark.errors import (
    ConfigError,
    InputDataError,
    OutOfSpaceError,
    PipelineError,
    UsageError,
    damaged_file_cause,
    failing_file_or_cause,
    java_cause,
    out_of_space,
)

log = logging.getLogger("mf_spark")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
INTERRUPTED_EXIT_CODE = 130  # the shell's code for SIGINT


#: Run dates outside this range are typos; near the ends of Python's calendar the window arithmetic
#: (the lookback before, the day after) raised OverflowError with a traceback.
RUN_DATE_RANGE = (dt.date(1900, 1, 1), dt.date(9999, 12, 30))


def parse_date(text: str) -> dt.date:
    try:
        date = parse_iso_date(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date in YYYY-MM-DD form: {text!r}") from None
    low, high = RUN_DATE_RANGE
    if not low <= date <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is outside {low} .. {high}")
    return date


def check_not_future(date: dt.date, why: str) -> None:
    """Refuse a run date after tomorrow (UTC; a scheduler east of UTC is a day ahead) with a UsageError
    that ends with ``why``.

    A typo (2052 for 2025) published by the nightly would hold latest.json for ever: later dates never
    move it. The ingest job refuses it too: its window would hold no event yet, and its ID-map version
    and ``ingest/dt=...`` directory would carry a date no run can have.
    """
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    if date > tomorrow:
        raise UsageError(f"run date {date} is in the future (today is {tomorrow - dt.timedelta(days=1)} UTC): {why}")


def non_empty(text: str) -> str:
    """argparse type of a path or id argument: an empty value (an unset scheduler variable) is a usage
    error, not the current directory or a crash after the job's work."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def base_parser(description: str) -> argparse.ArgumentParser:
    # Raw: the job docstrings are command examples, which argparse's default formatter runs together.
    # No abbreviations: spark-submit's --conf after the job file was taken as --config, --dat as --date.
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, type=non_empty, help="TOML config file, e.g. conf/local.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="Python log level (default INFO)")
    return parser


def config_source(cfg: dict[str, Any], overrides: Sequence[str], message: str = "") -> str:
    """Where a setting came from, for an error message: the config file, plus the ``--set`` overrides
    whose key ``message`` mentions."""
    source = cfg.get("_source", "the config")
    named = [o for o in overrides if o.split("=", 1)[0].strip() and o.split("=", 1)[0].strip() in message]
    return f"{source} with --set {', '.join(named)}" if named else source


def _mentioned(value: str, text: str) -> bool:
    # Path-like values only: "4" (executor cores) is in every message. Hadoop prints hdfs:///x as hdfs:/x.
    return len(value) > 3 and not value.isdigit() and (value in text or value.replace(":///", ":/") in text)


def session_failure_message(exc: BaseException, cfg: dict[str, Any], overrides: Sequence[str]) -> str:
    """One line for a SparkSession that would not start: the Java cause and the ``[spark]`` settings."""
    from mf_spark.publish import redact_argv, redact_settings

    cause = java_cause(exc)
    # Name the setting the cause mentions (Hadoop prints hdfs:///x as hdfs:/x); credentials stay out.
    suspects = [f"spark.{k} = {v}" for k, v in redact_settings(cfg.get("spark", {})).items()
                if _mentioned(str(v), cause)]
    spark_overrides = redact_argv([o for o in overrides if o.strip().startswith("spark.")])
    source = cfg.get("_source", "the config")
    source += f" with --set {', '.join(spark_overrides)}" if spark_overrides else ""
    where = f"{'; '.join(suspects)} in" if suspects else "the [spark] table of"
    return (f"Spark could not start with {where} {source}: {cause}. Nothing was written. A cluster config "
            "needs its cluster (HDFS, the master); to try it elsewhere, override the setting with --set")


#: Settings of the driver JVM itself, which is already running when a job reads its config.
DRIVER_JVM_KEYS = (
    "driver.memory", "driver.extraJavaOptions", "driver.extraClassPath", "driver.extraLibraryPath",
)


def warn_about_driver_settings(cfg: dict[str, Any]) -> list[str]:
    """Warn about ``[spark]`` keys that cannot take effect from the config; returns their names."""
    ignored = [key for key in DRIVER_JVM_KEYS if key in cfg.get("spark", {})]
    for key in ignored:
        log.warning("spark.%s in the [spark] table (%s) has no effect: the driver JVM is already running "
                    "when the job reads its config. Pass it to ./spark-submit.sh (--conf spark.%s=...) or set "
                    "it in conf/spark-defaults.conf", key, key_source(cfg, f"spark.{key}"), key)
    return ignored


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
    cfg = _checked_config(parser, args, validate_args)
    if isinstance(cfg, int):
        return cfg
    from mf_spark.session import build_session, stop_session  # late: config errors never wait for pyspark

    warn_about_driver_settings(cfg)
    started = time.perf_counter()
    try:
        spark = build_session(app_name, spark_properties(cfg))
    except Exception as exc:  # noqa: BLE001 - any start-up failure is reported against the [spark] table
        # A cluster config run on a laptop (hdfs:///... checkpoint dir, unknown master) fails here,
        # before anything is written; a traceback would hide which setting is wrong.
        print(f"error: {session_failure_message(exc, cfg, args.overrides)}", file=sys.stderr)
        return ConfigError.exit_code
    session_seconds = time.perf_counter() - started
    try:
        code = body(spark, cfg, args)
        # every job ends with its timing (the nightly also prints its stage table)
        log.info("%s finished in %.1f s (Spark session start-up %.1f s)", app_name, time.perf_counter() - started,
                 session_seconds)
        return int(code or 0)
    except PipelineError as exc:
        # one line: the log line of the same text printed it twice (three times with the run's own)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except BaseException as exc:
        code = _failure_exit_code(exc)
        if code is None:
            raise
        return code
    finally:
        stop_session(spark)


def _checked_config(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    validate_args: Callable[[argparse.Namespace, dict[str, Any]], None] | None,
) -> dict[str, Any] | int:
    """The validated config, or the exit code after printing why the job cannot start (before Spark)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        if validate_args:
            validate_args(args, cfg)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        # Checks across keys (gate metric vs ks, models) know the key, not the file it came from.
        where = "" if args.config in str(exc) else f"{config_source(cfg, args.overrides, str(exc))}: "
        print(f"config error: {where}{exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:  # e.g. an input path given on the command line that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return cfg


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C: the run's failed manifest and the lock release are already done on the way out; say what
    was published, if anything."""
    published = getattr(exc, "published_run", None)
    note = getattr(exc, "backfill_note", None)
    if published:
        print(f"error: interrupted after {published} was published (retention may not have run; the next "
              "nightly does it)", file=sys.stderr)
    elif not note:
        print("error: interrupted; nothing was published", file=sys.stderr)
    if note:
        print(f"error: {note}", file=sys.stderr)
    return INTERRUPTED_EXIT_CODE


def _failure_exit_code(exc: BaseException) -> int | None:
    """SIGTERM (SystemExit 143) or an unexpected error: say what was published before it, if anything, so
    nobody rolls back or reruns a good publication. A full disk or an input file gone under the job gets
    one line and its exit code; anything else returns None: the exit code and traceback stay as they are."""
    published = getattr(exc, "published_run", None)
    if published:
        print(f"error: {type(exc).__name__} after {published} was published: consumers read it, no rerun "
              "is needed", file=sys.stderr)
    if getattr(exc, "backfill_note", None):
        print(f"error: {exc.backfill_note}", file=sys.stderr)  # type: ignore[attr-defined]
    if isinstance(exc, Exception) and out_of_space(exc) and not published:
        # A full disk is the machine's state, not a bug: no traceback, and its own exit code
        message = f"no space left on device ({failing_file_or_cause(exc)}); free space on that disk and rerun"
        print(f"error: {message}", file=sys.stderr)
        return OutOfSpaceError.exit_code
    unreadable = damaged_file_cause(exc) if isinstance(exc, Exception) and not published else None
    if unreadable:
        # A file gone or damaged under a reading job (retention removed the run a standalone evaluate
        # or train job was reading: they take no lock) is the input's state: exit 3, one line.
        message = (f"an input file could not be read while the job ran: {unreadable}. A run that "
                   "retention (publish.keep_runs) removed, or a damaged file: read a run retention keeps, "
                   "or restore the file")
        print(f"error: {message}", file=sys.stderr)
        return InputDataError.exit_code
    return None
