"""The ingest stage: raw events -> interactions, rejects, ID maps and a report (see docs/ingest.md)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from mf_spark import publish
from mf_spark.errors import InputDataError, NoEventsError, NoInteractionsLeftError, damaged_file_cause
from mf_spark.ingest.id_maps import update_id_maps
from mf_spark.ingest.read import (
    PARTITION_FIELD,
    EventWindow,
    event_window,
    partition_column,
    prune_to_window,
    read_raw,
    to_canonical,
)
from mf_spark.ingest.report import (
    ConservationError,
    check_conservation,
    check_reject_threshold,
    ordered_reasons,
    reject_fraction,
    rows_in_window,
    write_report,
)
from mf_spark.ingest.rules import (
    BELOW_MIN_SUPPORT,
    BOT_USER,
    aggregate_pairs,
    bot_users,
    classify_rows,
    deduplicate,
    filter_support,
    with_contribution,
)
from mf_spark.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What one ingest run produces.

    Attributes
    ----------
    interactions : DataFrame
        One row per (user, item): ``user_idx`` int, ``item_idx`` int, ``strength`` float, ``n_events``
        long, ``first_ts`` timestamp, ``last_ts`` timestamp. Persisted (``MEMORY_AND_DISK``) and
        materialised; release with :meth:`unpersist`.
    rejects : DataFrame
        ``user_id, item_id, event_type, event_ts, value`` (raw values as strings), ``reason``,
        ``source_file``. Persisted and materialised like ``interactions``.
    dim_user, dim_item : DataFrame
        The full maps after this run: ``user_id`` string, ``user_idx`` int (``item_id``, ``item_idx``).
    report : dict
        Counts of the run, see :func:`run_ingest`.
    """

    interactions: DataFrame
    rejects: DataFrame
    dim_user: DataFrame
    dim_item: DataFrame
    report: dict[str, Any]

    def unpersist(self) -> None:
        """Release the cached ``interactions`` and ``rejects``."""
        self.interactions.unpersist()
        self.rejects.unpersist()


def _rejects(frame: DataFrame, reason: Any) -> DataFrame:
    return frame.select(
        "user_id",
        "item_id",
        "event_type",
        F.col("raw_event_ts").alias("event_ts"),
        F.col("raw_value").alias("value"),
        (F.lit(reason) if isinstance(reason, str) else reason).alias("reason"),
        "source_file",
    )


def run_ingest(
    spark: SparkSession,
    *,
    input_path: str,
    input_format: str,
    columns: dict[str, str],
    reader_options: dict[str, str],
    settings: IngestSettings,
    run_date: dt.date,
    id_map_root: str,
    run_id: str,
) -> IngestResult:
    """Turn the raw events of the window ending on ``run_date`` into the interaction table.

    Parameters
    ----------
    input_path, input_format, reader_options : str, str, dict
        The raw event table (``input.path``, ``input.format``, ``input.options``).
    columns : dict
        ``input.columns``: canonical field (``user_id, item_id, event_type, event_ts, value``, and
        ``event_date`` for the partition column) -> raw column name.
    settings : IngestSettings
        The rules.
    run_date : datetime.date
        Last day of the window.
    id_map_root : str
        Local directory of the ID maps (``<output.root>/id_maps``).
    run_id : str
        Names the ID map versions this run writes.

    Returns
    -------
    IngestResult
        Its ``report`` holds ``rows_read, accepted_events, deduplicated, rejected, rejected_by_reason,
        reject_fraction, users, items, interactions, new_users, new_items, window, run_date,
        input_path, partition_pruned``; ``accepted_events + rejected + deduplicated == rows_read``.

    Raises
    ------
    InputDataError
        Missing input path, missing or uncastable mapped column (naming column and path), a damaged
        event file or one whose column types differ from the others' (naming file and column), a
        missing or damaged ID-map version, no events in the window
        (:class:`~mf_spark.errors.NoEventsError`), no interaction left after the rules
        (:class:`~mf_spark.errors.NoInteractionsLeftError`, which carries the rejects and the report).
    RejectThresholdError
        The reject fraction exceeds ``settings.max_reject_fraction``; no ID map is written.
    """
    window = event_window(run_date, settings.lookback_days)
    canonical, pruned_by = _read_events(
        spark, input_path, input_format, columns, reader_options, settings, window
    )

    classified = canonical.transform(classify_rows(settings, window)).persist(StorageLevel.MEMORY_AND_DISK)
    caches: list[DataFrame] = [classified]
    outputs: list[DataFrame] = []  # released only on failure
    try:
        by_reason = _count_by_reason(classified, input_path)
        valid_rows = by_reason.pop(None, 0)
        rows_read = valid_rows + sum(by_reason.values())
        _check_events_in_window(rows_read, by_reason, window, input_path, pruned_by)

        valid = classified.filter(F.col("reason").isNull())
        # Cached: the bot rule, the dedup count and the aggregation all read the distinct events.
        unique_events = deduplicate(valid).persist(StorageLevel.MEMORY_AND_DISK)
        caches.append(unique_events)
        bots = bot_users(unique_events, settings.max_events_per_user_day).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        caches.append(bots)
        bot_rows = valid.join(bots, "user_id", "left_semi")
        if settings.max_events_per_user_day > 0:
            by_reason[BOT_USER] = bot_rows.count()
        hint = _reject_hint(classified, settings, rows_read, by_reason)
        fraction = check_reject_threshold(rows_read, by_reason, settings.max_reject_fraction, input_path, hint)

        events = unique_events.join(bots, "user_id", "left_anti").transform(
            with_contribution(settings, window)
        )
        totals = events.agg(F.count(F.lit(1)).alias("unique"), F.sum("copies").alias("rows")).first()
        deduplicated = int(totals["rows"] or 0) - int(totals["unique"])

        pairs = aggregate_pairs(events).persist(StorageLevel.MEMORY_AND_DISK)
        caches.append(pairs)
        kept = filter_support(
            pairs, settings.min_events_per_user, settings.min_events_per_item, settings.k_core
        )
        caches.append(kept)
        kept_totals = _kept_totals(kept)
        _check_no_overflow(kept_totals, input_path)

        # The rejects table is materialised from the same cached rows as the counts, so a file landing
        # in the input during the run cannot make it disagree with the report.
        rejects = _rejects_table(classified, bot_rows, events, pairs, kept, settings).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        outputs.append(rejects)
        rejected_by_reason = _check_rejects_match(rejects, by_reason)
        report: dict[str, Any] = {
            "run_date": run_date.isoformat(),
            "window": [window.start.isoformat(), window.end.isoformat()],
            "input_path": input_path,
            "partition_pruned": bool(pruned_by),
            "rows_read": rows_read,
            "accepted_events": int(kept_totals["events"] or 0),
            "deduplicated": deduplicated,
            "rejected": sum(rejected_by_reason.values()),
            "rejected_by_reason": rejected_by_reason,
            "reject_fraction": fraction,
            "users": int(kept_totals["users"]),
            "items": int(kept_totals["items"]),
            "interactions": int(kept_totals["pairs"]),
            "newest_event": kept_totals["newest"],
        }
        _warn_if_run_date_has_no_event(kept_totals["newest"], run_date)
        check_conservation(report)
        if report["interactions"] == 0:
            raise NoInteractionsLeftError(
                f"no interaction left in {input_path} for {window.start} .. {window.end} after the rules "
                f"(min_events_per_user={settings.min_events_per_user}, "
                f"min_events_per_item={settings.min_events_per_item}, k_core={settings.k_core}); "
                f"rejects by reason: {rejected_by_reason}",
                rejects=rejects, report=report,
            )

        maps = update_id_maps(spark, id_map_root, run_id, kept.select("user_id"), kept.select("item_id"))
        report["new_users"] = maps.new_users
        report["new_items"] = maps.new_items
        interactions = (
            kept.join(maps.dim_user, "user_id")
            .join(maps.dim_item, "item_id")
            .select("user_idx", "item_idx", "strength", "n_events", "first_ts", "last_ts")
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        outputs.append(interactions)
        joined = interactions.count()
        if joined != report["interactions"]:
            raise AssertionError(f"ID map join kept {joined} of {report['interactions']} interactions")
        outputs.clear()  # success: the caller owns the persisted outputs
    finally:
        for frame in reversed(caches + outputs):
            frame.unpersist()

    log.info("ingest %s: %s", run_date, report)
    return IngestResult(interactions, rejects, maps.dim_user, maps.dim_item, report)


def _read_events(
    spark: SparkSession,
    input_path: str,
    input_format: str,
    columns: dict[str, str],
    reader_options: dict[str, str],
    settings: IngestSettings,
    window: EventWindow,
) -> tuple[DataFrame, str | None]:
    """The raw table in canonical columns, pruned to the window's partitions when it has a date column.

    Returns the frame and the partition column it was pruned by (``None`` when not pruned).
    """
    text_columns = [columns.get(field, field) for field in ("user_id", "item_id", "event_type")]
    raw = read_raw(spark, input_path, input_format, reader_options, text_columns=text_columns)
    pruned_by = partition_column(raw, columns.get(PARTITION_FIELD, PARTITION_FIELD))
    if pruned_by:
        raw = prune_to_window(raw, pruned_by, window)
    value_required = any(rule.use_value for rule in settings.event_types.values())
    return to_canonical(raw, columns, input_path, value_required, reader_options), pruned_by


def _count_by_reason(classified: DataFrame, input_path: str) -> dict[str | None, int]:
    """Rows per reject reason (``None``: valid): the one pass over the raw files; later counts read the cache."""
    try:
        return {row["reason"]: row["count"] for row in classified.groupBy("reason").count().collect()}
    except Exception as exc:
        cause = damaged_file_cause(exc)
        if cause is None:
            raise
        # read_raw checked one file; Spark infers the schema from one footer too, so a damaged file
        # or one whose column types differ from its siblings' fails here, behind a Py4J trace.
        raise InputDataError(f"input.path = {input_path}: an event file cannot be read: {cause}. Every "
                             "file of the input must be readable and of one schema; nothing was written")


def _check_events_in_window(
    rows_read: int, by_reason: dict[str | None, int], window: EventWindow, input_path: str, pruned_by: str | None
) -> None:
    if rows_read == 0 or rows_in_window(rows_read, by_reason) == 0:
        raise NoEventsError(
            f"no events in the window {window.start} .. {window.end} in {input_path} "
            f"({rows_read} rows read{', partitions pruned by ' + pruned_by if pruned_by else ''})"
        )


def _reject_hint(
    classified: DataFrame, settings: IngestSettings, rows_read: int, by_reason: dict[str | None, int]
) -> str:
    """What to change when the reject fraction is over the limit because of the input's form."""
    if reject_fraction(rows_read, by_reason) <= settings.max_reject_fraction:
        return ""
    hints = []
    if by_reason.get("unknown_event_type"):
        hints.append(unknown_event_type_hint(classified, settings))
    if by_reason.get("invalid_encoding"):
        hints.append(
            "Ids or event types with bytes that are not UTF-8 (invalid_encoding): give the files' encoding as "
            "input.options.encoding, e.g. \"ISO-8859-1\" or \"windows-1252\".")
    return " ".join(hint for hint in hints if hint)


def _kept_totals(kept: DataFrame) -> Row:
    """Pairs, events, users, items, the newest event and the count of overflowed strengths of the kept pairs."""
    return kept.agg(
        F.count(F.lit(1)).alias("pairs"),
        F.sum("n_events").alias("events"),
        F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("items"),
        # as text in the session's time zone (UTC in the jobs): a collected timestamp is converted to
        # the driver process's local zone
        F.date_format(F.max("last_ts"), "yyyy-MM-dd HH:mm:ss").alias("newest"),
        F.count(F.when(F.isnan("strength") | (F.abs("strength") == F.lit(float("inf"))), 1)).alias("overflow"),
    ).first()


def _check_no_overflow(kept_totals: Row, input_path: str) -> None:
    if kept_totals["overflow"]:
        # Each value is within float32's range, but weight * value or the sum over a pair's events is
        # not: the strength column would hold inf and ALS would refuse it far from its cause.
        raise InputDataError(
            f"{kept_totals['overflow']} (user, item) pairs in {input_path} sum to a strength beyond float32's "
            "range (weight * value summed over their events); cap the values with "
            "ingest.event_types.<type>.value_cap. No ID map was written"
        )


def _rejects_table(
    classified: DataFrame,
    bot_rows: DataFrame,
    events: DataFrame,
    pairs: DataFrame,
    kept: DataFrame,
    settings: IngestSettings,
) -> DataFrame:
    """Every rejected raw row with its reason: rule failures, bot users' rows, and below-support pairs' events."""
    parts = [_rejects(classified.filter(F.col("reason").isNotNull()), F.col("reason"))]
    if settings.max_events_per_user_day > 0:
        parts.append(_rejects(bot_rows, BOT_USER))
    if kept is not pairs:
        removed = pairs.join(kept.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
        support = events.join(removed.select("user_id", "item_id"), ["user_id", "item_id"], "left_semi")
        parts.append(_rejects(support, BELOW_MIN_SUPPORT))
    return functools.reduce(DataFrame.unionByName, parts)


def _check_rejects_match(rejects: DataFrame, by_reason: dict[str | None, int]) -> dict[str, int]:
    """The rejects table's rows per reason, in report order, after checking them against the counts taken before."""
    in_table = {row["reason"]: row["count"] for row in rejects.groupBy("reason").count().collect()}
    for reason, n in by_reason.items():
        if in_table.get(reason, 0) != n:
            raise ConservationError(
                f"the rejects table holds {in_table.get(reason, 0)} rows with reason {reason}, {n} were counted"
            )
    return ordered_reasons(in_table)


def _warn_if_run_date_has_no_event(newest: str | None, run_date: dt.date) -> None:
    if newest is not None and newest[:10] < run_date.isoformat():
        # A partition that never arrived looked like a quiet day: the window's older events still
        # trained and published a model, with nothing in the log.
        log.warning("no accepted event is dated %s, the run date: the newest is from %s. If events are "
                    "expected every day, check that the input for %s has arrived", run_date, newest, run_date)


def ingest_job_output_dir(root: str, run_date: dt.date) -> str:
    """The directory :func:`run_ingest_job` writes ``interactions``, ``rejects`` and ``report.json`` to."""
    return os.path.join(root, "ingest", f"dt={run_date.isoformat()}")


def run_ingest_job(
    spark: SparkSession, cfg: dict[str, Any], run_date: dt.date, *, break_stale_lock: bool = False
) -> dict[str, Any]:
    """The standalone ingest (``jobs/ingest.py``): :func:`run_ingest` for ``run_date`` plus its outputs.

    Writes ``<output.root>/ingest/dt=D/{interactions,rejects}`` (Parquet) and ``report.json`` and
    updates ``<output.root>/id_maps``, all while holding the output root's lock
    (:class:`mf_spark.publish.RunLock`, purpose ``ingest``). The ID maps are shared with the nightly,
    which numbers new ids from the sizes it reads: without the lock, a nightly and this job running
    at once would give the same index to different ids.

    Parameters
    ----------
    cfg : dict
        The validated config (``input``, ``ingest``, ``output.root``).
    break_stale_lock : bool
        Break a lock left by a dead process on this host (as ``--break-stale-lock`` of the nightly).

    Returns
    -------
    dict
        The ingest report (see :func:`run_ingest`).

    Raises
    ------
    LockHeldError
        When another run (a nightly, a rollback, another ingest) holds the lock; nothing is written.
    InputDataError, RejectThresholdError
        As :func:`run_ingest`.
    """
    root = cfg["output"]["root"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out = ingest_job_output_dir(root, run_date)
    with publish.RunLock(root, run_date=run_date, break_stale=break_stale_lock, purpose="ingest"):
        try:
            result = run_ingest(
                spark,
                input_path=cfg["input"]["path"],
                input_format=cfg["input"]["format"],
                columns=cfg["input"]["columns"],
                reader_options=cfg["input"]["options"],
                settings=IngestSettings.from_config(cfg["ingest"]),
                run_date=run_date,
                id_map_root=os.path.join(root, "id_maps"),
                run_id=f"ingest-{run_date.isoformat()}-{stamp}",
            )
        except NoInteractionsLeftError as exc:
            # Every row rejected is exactly when the operator wants to see the rejects (the documented
            # way to inspect an exit-4 run goes through here), so write them before failing. No
            # interactions/ then: an earlier run's would contradict the report beside them.
            # The set is swapped in whole (publish.staged_dir): a rerun failing halfway left new
            # interactions beside the old report.
            with publish.staged_dir(out) as staging:
                write_rejects_for_inspection(exc, os.path.join(staging, "rejects"),
                                             shown_as=os.path.join(out, "rejects"))
                write_report({**exc.report, "error": str(exc)}, os.path.join(staging, "report.json"))
            raise
        try:
            with publish.staged_dir(out) as staging:
                result.interactions.orderBy("user_idx", "item_idx").write.parquet(os.path.join(staging, "interactions"))
                result.rejects.write.parquet(os.path.join(staging, "rejects"))
                write_report(result.report, os.path.join(staging, "report.json"))
        finally:
            result.unpersist()
    return result.report


def write_rejects_for_inspection(exc: NoInteractionsLeftError, path: str, shown_as: str | None = None) -> None:
    """Write the rejects an ingest failed with to ``path`` and say so in the error's message (naming
    ``shown_as``, where they end up, when ``path`` is a staging directory)."""
    exc.rejects.write.mode("overwrite").parquet(path)
    exc.args = (f"{exc.args[0]}. The rejected rows, with their reason, are in {shown_as or path}",)


def unknown_event_type_hint(classified: DataFrame, settings: IngestSettings) -> str:
    """The commonest event types that were rejected as unknown, against the configured ones: when most
    rows are rejected for this, the config's ``ingest.event_types`` does not describe the input."""
    top = (classified.where(F.col("reason") == "unknown_event_type").groupBy("event_type").count()
           .orderBy(F.desc("count"), "event_type").limit(5).collect())
    seen = ", ".join(f"{row['event_type']!r} ({row['count']:,})" for row in top)
    return (f"Event types rejected as unknown, commonest first: {seen}; configured in ingest.event_types: "
            f"{', '.join(sorted(settings.event_types))}.")
