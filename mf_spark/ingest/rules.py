"""The ingest rules as DataFrame transforms: reject reasons, dedup, bots, strength, aggregation, support.

Every function takes and returns DataFrames (or returns such a function for ``DataFrame.transform``);
none triggers a Spark job except :func:`filter_support`, whose k-core loop must count to stop.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

# strengths are float32 and summed as the ALS blocks that read them do
from mf_spark.als.blocks import FLOAT32_MAX, ordered_sum
from mf_spark.ingest.read import EventWindow
from mf_spark.ingest.settings import EventTypeRule, IngestSettings

log = logging.getLogger(__name__)

#: Row-level reject reasons, in precedence order: a row gets the first that applies.
ROW_REASONS = (
    "malformed_record",
    # Before the other row problems: an old row is not this run's data, so a problem in it (a retired
    # event type, ids a later fix cleaned up) must not count towards max_reject_fraction. An
    # unpartitioned log holds every day, and each nightly failed on years-old rows.
    "outside_window",
    # After the window: a later run's data, for the same reason. A nightly at 03:30 UTC for yesterday
    # over an unpartitioned log read today's first hours, and counting them failed it as bad data.
    "future_timestamp",
    "null_user_id",
    "empty_user_id",
    "null_item_id",
    "empty_item_id",
    # Spark decodes CSV and JSON as UTF-8 unless told otherwise and puts U+FFFD for bytes it cannot
    # decode: Latin-1 "josé" and "josè" both became "jos\ufffd", one user, for ever in the ID map.
    "invalid_encoding",
    "user_id_too_long",
    "item_id_too_long",
    "unknown_event_type",
    "null_timestamp",
    "unparseable_timestamp",
    "invalid_value",
)
#: What a decoder puts for bytes that are not valid in the encoding it was told (UTF-8 by default).
REPLACEMENT_CHARACTER = "\ufffd"
#: Reasons decided after the row level: the bot rule, then the support filters.
BOT_USER = "bot_user"
BELOW_MIN_SUPPORT = "below_min_support"
REJECT_REASONS = (*ROW_REASONS, BOT_USER, BELOW_MIN_SUPPORT)
#: Reasons that are not bad data: they do not count towards ``max_reject_fraction`` (see docs/ingest.md).
NOT_COUNTED_IN_REJECT_FRACTION = ("outside_window", "future_timestamp", BELOW_MIN_SUPPORT)

#: An event is identified by these fields; rows equal on all of them are one event counted once.
EVENT_KEY = ("user_id", "item_id", "event_type", "event_ts", "value")
#: Columns of the rejects table; raw values as strings.
REJECT_COLUMNS = ("user_id", "item_id", "event_type", "event_ts", "value", "reason", "source_file")

_SECONDS_PER_DAY = 86400.0


def _is_blank(col: Column) -> Column:
    # Tabs, newlines and no-break spaces too: trim() strips only ' ', and such ids entered the ID maps
    return F.regexp_replace(col, r"[\s\p{Z}]", "") == F.lit("")


def _rule_expr(
    rules: dict[str, EventTypeRule], pick: Callable[[EventTypeRule], object], otherwise: object
) -> Column:
    """A CASE on event_type selecting one attribute of each type's rule."""
    expr: Column | None = None
    for name, rule in sorted(rules.items()):
        cond = F.col("event_type") == F.lit(name)
        expr = F.when(cond, F.lit(pick(rule))) if expr is None else expr.when(cond, F.lit(pick(rule)))
    assert expr is not None  # IngestSettings guarantees at least one type
    return expr.otherwise(F.lit(otherwise))


def classify_rows(settings: IngestSettings, window: EventWindow) -> Callable[[DataFrame], DataFrame]:
    """Add ``reason`` (string): the first row-level reject reason of :data:`ROW_REASONS`, null if valid.

    Input: the canonical events of :func:`mf_spark.ingest.read.to_canonical`. ``invalid_value`` applies
    only to types with ``use_value``: a value that is present but unparseable, NaN, infinite or beyond
    float32's range (strengths are float32), or negative (negative is allowed with ``absolute_value``).
    A null value is valid (it counts as 1).
    """
    rules = settings.event_types
    value = F.col("value")
    uses_value = _rule_expr(rules, lambda r: r.use_value, False)
    allows_negative = _rule_expr(rules, lambda r: r.absolute_value, False)
    bad_value = (
        (F.col("raw_value").isNotNull() & value.isNull())
        | F.isnan(value)
        | (F.abs(value) > F.lit(FLOAT32_MAX))  # infinite, or beyond the float32 strength column's range
        | ((value < 0) & ~allows_negative)
    )
    undecodable = F.lit(False)
    for column in ("user_id", "item_id", "event_type"):
        undecodable = undecodable | F.coalesce(F.col(column).contains(REPLACEMENT_CHARACTER), F.lit(False))
    reason = (
        F.when(F.col("malformed"), F.lit("malformed_record"))
        .when(F.unix_micros("event_ts") < F.lit(window.start_micros), F.lit("outside_window"))
        .when(F.unix_micros("event_ts") >= F.lit(window.end_micros), F.lit("future_timestamp"))
        .when(F.col("user_id").isNull(), F.lit("null_user_id"))
        .when(_is_blank(F.col("user_id")), F.lit("empty_user_id"))
        .when(F.col("item_id").isNull(), F.lit("null_item_id"))
        .when(_is_blank(F.col("item_id")), F.lit("empty_item_id"))
        .when(undecodable, F.lit("invalid_encoding"))
        .when(F.length("user_id") > settings.max_id_length, F.lit("user_id_too_long"))
        .when(F.length("item_id") > settings.max_id_length, F.lit("item_id_too_long"))
        .when(
            ~F.col("event_type").isin(*sorted(rules)) | F.col("event_type").isNull(),
            F.lit("unknown_event_type"),
        )
        .when(F.col("raw_event_ts").isNull(), F.lit("null_timestamp"))
        .when(F.col("event_ts").isNull(), F.lit("unparseable_timestamp"))
        .when(uses_value & bad_value.eqNullSafe(True), F.lit("invalid_value"))
    )
    return lambda df: df.withColumn("reason", reason)


def deduplicate(valid: DataFrame) -> DataFrame:
    """One row per distinct event (:data:`EVENT_KEY`), with ``copies`` (long): how many rows had it.

    The raw fields kept for a later reject are the smallest ``(source_file, raw_event_ts, raw_value)``
    of the copies, so the choice does not depend on partitioning.
    """
    provenance = F.min(F.struct("source_file", "raw_event_ts", "raw_value")).alias("first")
    return (
        valid.groupBy(*EVENT_KEY)
        .agg(provenance, F.count(F.lit(1)).alias("copies"))
        .select(*EVENT_KEY, "first.source_file", "first.raw_event_ts", "first.raw_value", "copies")
    )


def bot_users(events: DataFrame, max_events_per_user_day: int) -> DataFrame:
    """Users (``user_id``) with more than ``max_events_per_user_day`` distinct events on some UTC day.

    ``events`` holds distinct events (the output of :func:`deduplicate`), so a duplicated log line does
    not make a user a bot. Returns an empty frame when the rule is off (0).
    """
    if max_events_per_user_day <= 0:
        return events.select("user_id").limit(0)
    # The UTC day from epoch seconds, independent of the session time zone.
    day = F.floor(F.unix_micros("event_ts") / F.lit(86_400_000_000))
    return (
        events.groupBy("user_id", day.alias("day"))
        .count()
        .filter(F.col("count") > max_events_per_user_day)
        .select("user_id")
        .distinct()
    )


def with_contribution(settings: IngestSettings, window: EventWindow) -> Callable[[DataFrame], DataFrame]:
    """Add ``contribution`` (double): ``weight * v * decay`` of one distinct event.

    ``v`` is 1 for a type without ``use_value``; otherwise the value (``|value|`` with ``absolute_value``;
    null counts as 1) capped at ``value_cap``. ``decay = 0.5 ** (age_days / half_life_days)`` with the age
    measured from the end of the run date; 1 when ``half_life_days`` is 0.
    """
    rules = settings.event_types
    weight = _rule_expr(rules, lambda r: r.weight, 0.0).cast("double")
    uses_value = _rule_expr(rules, lambda r: r.use_value, False)
    absolute = _rule_expr(rules, lambda r: r.absolute_value, False)
    cap = _rule_expr(rules, lambda r: r.value_cap, None).cast("double")
    value = F.coalesce(F.when(absolute, F.abs("value")).otherwise(F.col("value")), F.lit(1.0))
    capped = F.when(cap.isNull(), value).otherwise(F.least(value, cap))
    multiplier = F.when(uses_value, capped).otherwise(F.lit(1.0))
    if settings.half_life_days > 0:
        end_seconds = window.end_micros / 1e6
        age_days = (F.lit(end_seconds) - F.unix_micros("event_ts") / F.lit(1e6)) / F.lit(_SECONDS_PER_DAY)
        decay = F.pow(F.lit(0.5), age_days / F.lit(settings.half_life_days))
    else:
        decay = F.lit(1.0)
    return lambda df: df.withColumn("contribution", weight * multiplier * decay)


def aggregate_pairs(events: DataFrame) -> DataFrame:
    """One row per (user_id, item_id): ``strength`` float, ``n_events`` long, ``first_ts``, ``last_ts``.

    ``strength`` sums the contributions in ascending order, so the float result is the same however
    Spark partitions and orders the shuffle (a plain ``sum`` is not associative in floating point).
    """
    return events.groupBy("user_id", "item_id").agg(
        ordered_sum("contribution").cast("float").alias("strength"),
        F.count(F.lit(1)).alias("n_events"),
        F.min("event_ts").alias("first_ts"),
        F.max("event_ts").alias("last_ts"),
    )


def _support_pass(pairs: DataFrame, min_per_user: int, min_per_item: int) -> DataFrame:
    users = pairs.groupBy("user_id").count().filter(F.col("count") >= min_per_user).select("user_id")
    items = pairs.groupBy("item_id").count().filter(F.col("count") >= min_per_item).select("item_id")
    kept = pairs.join(users, "user_id", "left_semi").join(items, "item_id", "left_semi")
    return kept.select(*pairs.columns)


def filter_support(pairs: DataFrame, min_per_user: int, min_per_item: int, k_core: bool) -> DataFrame:
    """Keep pairs whose user has >= ``min_per_user`` pairs and whose item has >= ``min_per_item`` pairs.

    One pass counts users and items on the same input; with ``k_core`` the pass repeats until nothing
    changes, so both minimums hold in the result. Columns are those of ``pairs``. With ``k_core`` each
    pass's result is checkpointed (the session's checkpoint directory) and the returned frame is
    persisted (``MEMORY_AND_DISK``); the caller unpersists it.
    """
    if min_per_user <= 1 and min_per_item <= 1:
        return pairs
    kept = _support_pass(pairs, min_per_user, min_per_item)
    if not k_core:
        return kept
    size = pairs.count()
    cached: DataFrame | None = None
    for iteration in itertools.count(1):
        # A pass reads its input three times (two counts, one join), so without cutting the plan each pass
        # tripled the plan tree: a cascade of six passes exhausted the driver's heap analysing it.
        kept = kept.checkpoint(eager=True).persist(StorageLevel.MEMORY_AND_DISK)
        kept_size = kept.count()
        # The pass just counted read `cached`; only now can it be released.
        if cached is not None:
            cached.unpersist()
        cached = kept
        log.info("k-core pass %d: %d -> %d pairs", iteration, size, kept_size)
        if kept_size == size:
            return kept
        size = kept_size
        kept = _support_pass(kept, min_per_user, min_per_item)
    raise AssertionError("unreachable")  # pragma: no cover
