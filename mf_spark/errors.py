"""Errors a job reports to its operator, each with its own exit code.

A job catches :class:`PipelineError`, prints its message (no stack trace) and exits with ``exit_code``;
anything else is a bug and exits 1 with the traceback, except a full disk (ENOSPC), which exits 8
(:class:`OutOfSpaceError`) with one line. The README's operations section lists the codes.
"""

from __future__ import annotations

import errno
import re


class PipelineError(Exception):
    """Base of the errors an operator can act on."""

    exit_code = 1


class ConfigError(PipelineError, ValueError):
    """Bad configuration: an unknown key, a wrong type, a missing required key (names key and file)."""

    exit_code = 2


class UsageError(ConfigError):
    """Arguments that contradict each other (``--from`` after ``--to``, ``--model`` without
    ``--interactions``): reported argparse-style as the job's usage error, not against the config file."""


class InputDataError(PipelineError, ValueError):
    """Bad or missing input data: a missing column or file, an uncastable type, no events for the date."""

    exit_code = 3


class NoEventsError(InputDataError):
    """No event in the run date's window: an empty day (a holiday, a short ``ingest.lookback_days``) or
    the wrong input. Its own class so that a backfill can skip such dates (``--skip-empty-days``)
    without skipping damaged input."""


class NoInteractionsLeftError(InputDataError):
    """Events were read but none survived the rules (all rejected or below the support minimums).

    Carries the ``rejects`` DataFrame and the ingest ``report`` so that the job can still write them:
    the rows and their reasons are what the operator needs to see.
    """

    def __init__(self, message: str, rejects: object = None, report: dict | None = None) -> None:
        super().__init__(message)
        self.rejects = rejects
        self.report = report


class RejectThresholdError(PipelineError):
    """Too many input rows were rejected; nothing was published."""

    exit_code = 4


class QualityGateError(PipelineError):
    """The evaluation quality gate failed; nothing was published."""

    exit_code = 5


class LockHeldError(PipelineError):
    """Another run holds the output root's lock."""

    exit_code = 6


class PublishError(PipelineError):
    """The output root's publication state forbids the action: no such run to roll back to, a corrupt
    latest.json or manifest."""

    exit_code = 7


class OutOfSpaceError(PipelineError):
    """The disk being written to is full (ENOSPC): an environment problem, not bad data or a bug."""

    exit_code = 8


#: How a Java stack says ENOSPC (Hadoop wraps it: ``FSError: java.io.IOException: No space left on device``).
_JAVA_NO_SPACE = re.compile(r"java\.io\.IOException: No space left on device")


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk: an ``OSError`` with ENOSPC, or a Spark / Py4J error whose Java stack
    has ``java.io.IOException: No space left on device``; also when explicitly raised from one
    (``raise ... from``). Not an error merely raised while one was being handled (a bug in the handler
    must keep its traceback), and never itself an error: a Py4J error's text needs the JVM, which may be
    gone by then."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if _JAVA_NO_SPACE.search(error_text(current)):
            return True
        current = current.__cause__
    return False


def failing_file_or_cause(exc: BaseException) -> str:
    """The file an ``OSError`` names, else :func:`java_cause`: where a full disk stopped the job."""
    return exc.filename if isinstance(exc, OSError) and exc.filename else java_cause(exc)


def error_text(exc: BaseException) -> str:
    """``str(exc)``, which never raises: a Py4J error's text comes from the JVM, and once the Spark driver
    is gone (spark-submit got SIGTERM) reading it raised inside the failure handler, so the failed run
    got no manifest."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - any failure to describe must not replace the error described
        return "(its message could not be read: the Spark driver is gone)"


def java_cause(exc: BaseException) -> str:
    """The first line of the Java exception inside a Py4J error (``java.io.IOException: ...``), or the
    error's own first line: what an operator needs, without the JVM stack."""
    text = error_text(exc).strip()
    java = [line.lstrip(": ") for line in text.splitlines() if line.lstrip(": ").startswith(("java.", "org."))]
    if java:
        return java[0]
    return text.splitlines()[0] if text else type(exc).__name__


#: Spark error conditions that mean a file's content is at fault (damaged, or of another schema than its
#: siblings), not the cluster. Not FAILED_READ_FILE itself: Spark wraps any error met while reading a
#: file in it (a missing HDFS block, an S3 503, an expired token), and those must fail as they are.
#: ChecksumException: the bytes disagree with Hadoop's .crc (local files) or with every HDFS replica.
DAMAGED_FILE_MARKERS = ("CANNOT_READ_FILE_FOOTER", "FILE_NOT_EXIST", "PARQUET_COLUMN_DATA_TYPE_MISMATCH",
                        "ParquetDecodingException", "is not a Parquet file", "ChecksumException")


def damaged_file_cause(exc: BaseException, markers: tuple[str, ...] = DAMAGED_FILE_MARKERS) -> str | None:
    """The sentence of a Spark error that names the unreadable file and why (``[FAILED_READ_FILE.
    PARQUET_COLUMN_DATA_TYPE_MISMATCH] Encountered error while reading file F. ... column [user_id] ...``),
    or None when ``exc`` carries none of ``markers`` (then it is not the files' fault: re-raise it)."""
    for line in error_text(exc).splitlines():
        hit = next((m for m in markers if m in line), None)
        if hit is None:
            continue
        # From the condition's bracket when there is one: drops "Job aborted ... Lost task ...: " prefixes
        start = line.rfind("[", 0, line.index(hit))
        sentence = (line[start:] if start >= 0 else line).strip()
        sentence = re.sub(r"\s*SQLSTATE: \w+\.?$", "", sentence)
        return sentence[:1000]
    return None
