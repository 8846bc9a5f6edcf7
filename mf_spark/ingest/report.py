"""The ingest run report: counts, the conservation check, the reject threshold, JSON and a short table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mf_spark.errors import RejectThresholdError
from mf_spark.ingest.rules import NOT_COUNTED_IN_REJECT_FRACTION, REJECT_REASONS


class ConservationError(AssertionError):
    """accepted + rejected + deduplicated != rows read: a bug in the ingest code, never bad data."""


def check_conservation(report: dict[str, Any]) -> None:
    """Raise :class:`ConservationError` unless every row read is accounted for exactly once."""
    accounted = report["accepted_events"] + report["rejected"] + report["deduplicated"]
    by_reason = sum(report["rejected_by_reason"].values())
    if accounted != report["rows_read"] or by_reason != report["rejected"]:
        raise ConservationError(
            f"ingest lost or invented rows: accepted {report['accepted_events']} "
            f"+ rejected {report['rejected']} + deduplicated {report['deduplicated']} = {accounted}, "
            f"rows read {report['rows_read']}; "
            f"rejects by reason sum to {by_reason}"
        )


def rows_in_window(rows_read: int, rejected_by_reason: dict[str, int]) -> int:
    """Rows read minus those before or after the run's window."""
    return rows_read - rejected_by_reason.get("outside_window", 0) - rejected_by_reason.get("future_timestamp", 0)


def reject_fraction(rows_read: int, rejected_by_reason: dict[str, int]) -> float:
    """Rejected rows over rows read in the window, without :data:`NOT_COUNTED_IN_REJECT_FRACTION` reasons.

    Rows before or after the window are not bad data (an unpartitioned log holds every day, and a
    nightly runs after its date has ended), and the support filters are a modelling choice, so none of
    them counts; ``bot_user`` does.
    """
    counted = sum(
        n for reason, n in rejected_by_reason.items() if reason not in NOT_COUNTED_IN_REJECT_FRACTION
    )
    denominator = rows_in_window(rows_read, rejected_by_reason)
    return counted / denominator if denominator > 0 else 0.0


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(
        f"{reason}={n:,}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def check_reject_threshold(
    rows_read: int, rejected_by_reason: dict[str, int], max_reject_fraction: float, input_path: str,
    hint: str = "",
) -> float:
    """Return the reject fraction; raise :class:`RejectThresholdError` when it exceeds the maximum.

    ``hint`` is appended to the message (e.g. which event types were seen but not configured)."""
    fraction = reject_fraction(rows_read, rejected_by_reason)
    if fraction > max_reject_fraction:
        counted = {
            r: n for r, n in rejected_by_reason.items() if r not in NOT_COUNTED_IN_REJECT_FRACTION and n
        }
        raise RejectThresholdError(
            f"{fraction:.2%} of the rows read in the window from {input_path} were rejected, above "
            f"ingest.max_reject_fraction = {max_reject_fraction:.2%} (rows read in the window: "
            f"{rows_in_window(rows_read, rejected_by_reason):,}); rejects by reason: "
            f"{_format_counts(counted)}.{' ' + hint if hint else ''} Nothing was published."
        )
    return fraction


def ordered_reasons(counts: dict[str, int]) -> dict[str, int]:
    """Counts in the documented reason order, zero counts dropped."""
    return {reason: int(counts[reason]) for reason in REJECT_REASONS if counts.get(reason)}


def format_report_table(report: dict[str, Any]) -> str:
    """The short table printed at the end of an ingest run."""
    rows: list[tuple[str, str]] = [
        ("window", f"{report['window'][0]} .. {report['window'][1]}"),
        ("rows read", f"{report['rows_read']:,}"),
        ("accepted events", f"{report['accepted_events']:,}"),
        ("deduplicated", f"{report['deduplicated']:,}"),
        ("rejected", f"{report['rejected']:,} ({report.get('reject_fraction', 0.0):.2%} counted)"),
    ]
    rows += [(f"  {reason}", f"{n:,}") for reason, n in report["rejected_by_reason"].items()]
    rows += [
        ("users", f"{report['users']:,} ({report['new_users']:,} new)"),
        ("items", f"{report['items']:,} ({report['new_items']:,} new)"),
        ("interactions", f"{report['interactions']:,}"),
        ("newest event", report.get("newest_event") or "-"),
    ]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"{label:<{width}}  {value:>{value_width}}" for label, value in rows]
    rule = "-" * (width + 2 + value_width)
    return "\n".join(["ingest report", rule, *lines, rule])


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as JSON, atomically (:func:`mf_spark.publish.write_json_atomic`: a reader never
    sees half a file; the file gets the umask's mode like every other file of a run, where a private
    ``mkstemp`` file was 0600)."""
    from mf_spark.publish import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report, sort_keys=False)
