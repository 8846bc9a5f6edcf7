"""The ingest rules as transforms on small hand-built canonical event tables."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from chispa import assert_approx_df_equality, assert_df_equality

from mf_spark.ingest.read import event_window
from mf_spark.ingest.rules import (
    aggregate_pairs,
    bot_users,
    classify_rows,
    deduplicate,
    filter_support,
    with_contribution,
)
from mf_spark.ingest.settings import EventTypeRule, IngestSettings

RUN_DATE = dt.date(2024, 3, 10)
WINDOW = event_window(RUN_DATE, 10)  # 2024-03-01 .. 2024-03-10

CANONICAL = (
    "user_id string, item_id string, event_type string, event_ts timestamp, value double, "
    "raw_event_ts string, raw_value string, source_file string, malformed boolean"
)

RULES = {
    "view": EventTypeRule(weight=1.0),
    "purchase": EventTypeRule(weight=4.0, use_value=True, value_cap=10.0),
    "return": EventTypeRule(weight=-2.0, use_value=True, absolute_value=True),
}


def settings(**overrides) -> IngestSettings:
    base = dict(lookback_days=10, max_id_length=8, event_types=RULES)
    base.update(overrides)
    return IngestSettings(**base)


def ts(text: str) -> dt.datetime:
    """A UTC instant; aware, so PySpark does not shift it by the machine's time zone."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def event(
    user, item, kind, when, value=None, *, raw_ts="same", raw_value="same", source="f1", malformed=False
):
    """One canonical row; the raw strings default to the parsed values."""
    parsed_ts = ts(when) if when else None
    return (
        user,
        item,
        kind,
        parsed_ts,
        value,
        (when if raw_ts == "same" else raw_ts),
        (None if value is None else repr(value)) if raw_value == "same" else raw_value,
        source,
        malformed,
    )


def test_classify_rows_gives_each_reason_in_precedence_order(spark):
    rows = [
        ("ok_view", event("u1", "i1", "view", "2024-03-10 10:00:00")),
        ("ok_view_value_ignored", event("u1", "i1", "view", "2024-03-10 10:00:00", None, raw_value="abc")),
        ("ok_purchase_null_value", event("u1", "i2", "purchase", "2024-03-01 00:00:00")),
        ("ok_return_negative", event("u1", "i2", "return", "2024-03-02 00:00:00", -3.0)),
        ("malformed", event(None, None, None, None, malformed=True)),
        ("null_user", event(None, "i1", "view", "2024-03-10 10:00:00")),
        ("empty_user", event(" ", "i1", "view", "2024-03-10 10:00:00")),
        ("null_item", event("u1", None, "view", "2024-03-10 10:00:00")),
        ("empty_item", event("u1", "", "view", "2024-03-10 10:00:00")),
        # trim() strips only spaces: these entered the ID maps as ids
        ("tab_user", event("\t", "i1", "view", "2024-03-10 10:00:00")),
        ("nbsp_item", event("u1", "\u00a0\n", "view", "2024-03-10 10:00:00")),
        ("huge_value", event("u1", "i1", "purchase", "2024-03-10 10:00:00", 1e300)),  # inf as float32
        # U+FFFD: bytes the reader could not decode; before item_id_too_long ("\ufffd" * 9 is both)
        ("undecodable_user", event("jos\ufffd", "i1", "view", "2024-03-10 10:00:00")),
        ("undecodable_item", event("u1", "\ufffd" * 9, "view", "2024-03-10 10:00:00")),
        ("undecodable_type", event("u1", "i1", "vi\ufffdw", "2024-03-10 10:00:00")),
        ("long_user", event("u" * 9, "i1", "view", "2024-03-10 10:00:00")),
        ("long_item", event("u1", "i" * 9, "view", "2024-03-10 10:00:00")),
        ("unknown_type", event("u1", "i1", "click", "2024-03-10 10:00:00")),
        ("null_type", event("u1", "i1", None, "2024-03-10 10:00:00")),
        ("null_ts", event("u1", "i1", "view", None, raw_ts=None)),
        ("bad_ts", event("u1", "i1", "view", None, raw_ts="yesterday")),
        ("negative", event("u1", "i1", "purchase", "2024-03-10 10:00:00", -1.0)),
        ("nan", event("u1", "i1", "purchase", "2024-03-10 10:00:00", float("nan"))),
        ("inf", event("u1", "i1", "return", "2024-03-10 10:00:00", float("-inf"))),
        ("unparseable_value", event("u1", "i1", "purchase", "2024-03-10 10:00:00", None, raw_value="lots")),
        ("future", event("u1", "i1", "view", "2024-03-11 00:00:00")),
        ("last_instant", event("u1", "i1", "view", "2024-03-10 23:59:59.999999")),
        ("before", event("u1", "i1", "view", "2024-02-29 23:59:59")),
        ("first_instant", event("u1", "i1", "view", "2024-03-01 00:00:00")),
        # two problems: the earlier reason in the precedence order wins (after the window: a later run's row)
        ("null_user_and_future", event(None, "i1", "click", "2030-01-01 00:00:00")),
        # a row before the window is outside_window whatever else is wrong with it (it is not counted)
        ("old_unknown_type", event("u1", "i1", "click", "2022-01-01 00:00:00")),
        ("old_null_user", event(None, "i1", "view", "2024-02-29 23:59:59")),
        ("old_invalid_value", event("u1", "i1", "purchase", "2023-05-01 00:00:00", -1.0)),
    ]
    df = spark.createDataFrame([(label, *row) for label, row in rows], f"label string, {CANONICAL}")
    actual = df.transform(classify_rows(settings(), WINDOW)).select("label", "reason")
    expected_reasons = {
        "ok_view": None,
        "ok_view_value_ignored": None,
        "ok_purchase_null_value": None,
        "ok_return_negative": None,
        "malformed": "malformed_record",
        "null_user": "null_user_id",
        "empty_user": "empty_user_id",
        "null_item": "null_item_id",
        "empty_item": "empty_item_id",
        "tab_user": "empty_user_id",
        "nbsp_item": "empty_item_id",
        "huge_value": "invalid_value",
        "undecodable_user": "invalid_encoding",
        "undecodable_item": "invalid_encoding",
        "undecodable_type": "invalid_encoding",
        # one reason "id_too_long" for both left the operator to find which id it was
        "long_user": "user_id_too_long",
        "long_item": "item_id_too_long",
        "unknown_type": "unknown_event_type",
        "null_type": "unknown_event_type",
        "null_ts": "null_timestamp",
        "bad_ts": "unparseable_timestamp",
        "negative": "invalid_value",
        "nan": "invalid_value",
        "inf": "invalid_value",
        "unparseable_value": "invalid_value",
        "future": "future_timestamp",
        "last_instant": None,
        "before": "outside_window",
        "first_instant": None,
        "null_user_and_future": "future_timestamp",  # a later run's row: its problems count there
        "old_unknown_type": "outside_window",
        "old_null_user": "outside_window",
        "old_invalid_value": "outside_window",
    }
    expected = spark.createDataFrame(list(expected_reasons.items()), "label string, reason string")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)



def test_window_edges_do_not_depend_on_the_jvms_time_zone(spark):
    """A datetime literal is rebased with the JVM's default zone before 1900: on a Los Angeles JVM the
    window started 422 s early and an event a minute before it was accepted."""
    from mf_spark.ingest.read import EventWindow

    window = EventWindow(dt.date(1850, 1, 1), dt.date(1850, 1, 10))
    rows = [(label, *event("u1", "i1", "view", when)) for label, when in (
        ("before", "1849-12-31 23:59:00"), ("first", "1850-01-01 00:00:00"),
        ("last", "1850-01-10 23:59:59"), ("after", "1850-01-11 00:00:00"))]
    time_zone = spark.sparkContext._jvm.java.util.TimeZone
    default = time_zone.getDefault()
    try:
        for zone in ("America/Los_Angeles", "Asia/Kolkata", "UTC"):
            time_zone.setDefault(time_zone.getTimeZone(zone))
            df = spark.createDataFrame(rows, f"label string, {CANONICAL}")
            reasons = {r.label: r.reason for r in df.transform(classify_rows(settings(), window)).collect()}
            assert reasons == {"before": "outside_window", "first": None, "last": None,
                               "after": "future_timestamp"}, zone
    finally:
        time_zone.setDefault(default)

def test_deduplicate_counts_copies_and_keeps_smallest_provenance(spark):
    rows = [
        event("u1", "i1", "view", "2024-03-10 10:00:00", source="b", raw_ts="2024-03-10T10:00:00Z"),
        event("u1", "i1", "view", "2024-03-10 10:00:00", source="a", raw_ts="2024-03-10 10:00:00"),
        event("u1", "i1", "view", "2024-03-10 10:00:00", source="c"),
        event("u1", "i1", "view", "2024-03-10 10:00:01", source="c"),  # another second: another event
        event("u1", "i1", "purchase", "2024-03-10 10:00:00", 2.0, source="d"),
        event("u1", "i1", "purchase", "2024-03-10 10:00:00", 3.0, source="d"),  # another value
        event("u1", "i1", "purchase", "2024-03-10 10:00:00", 3.0, source="d", raw_value="3"),
    ]
    actual = deduplicate(spark.createDataFrame(rows, CANONICAL)).select(
        "event_type", "event_ts", "value", "source_file", "raw_event_ts", "raw_value", "copies"
    )
    expected = spark.createDataFrame(
        [
            ("view", ts("2024-03-10 10:00:00"), None, "a", "2024-03-10 10:00:00", None, 3),
            ("view", ts("2024-03-10 10:00:01"), None, "c", "2024-03-10 10:00:01", None, 1),
            ("purchase", ts("2024-03-10 10:00:00"), 2.0, "d", "2024-03-10 10:00:00", "2.0", 1),
            ("purchase", ts("2024-03-10 10:00:00"), 3.0, "d", "2024-03-10 10:00:00", "3", 2),
        ],
        "event_type string, event_ts timestamp, value double, source_file string, raw_event_ts string, "
        "raw_value string, copies long",
    )
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_bot_users_counts_distinct_events_per_utc_day(spark):
    rows = [
        # bot: 3 events on 03-09 (limit 2)
        *(event("bot", f"i{k}", "view", f"2024-03-09 0{k}:00:00") for k in range(3)),
        # busy but not a bot: 2 events per day on two days, 4 in total
        *(event("busy", f"i{k}", "view", f"2024-03-0{day} 23:5{k}:00") for day in (8, 9) for k in range(2)),
        # duplicates of one event do not count: the input of bot_users is deduplicated
        event("dup", "i1", "view", "2024-03-09 01:00:00"),
        event("dup", "i1", "view", "2024-03-09 01:00:00"),
        event("dup", "i2", "view", "2024-03-09 02:00:00"),
    ]
    events = deduplicate(spark.createDataFrame(rows, CANONICAL))
    actual = bot_users(events, 2)
    assert_df_equality(actual, spark.createDataFrame([("bot",)], "user_id string"), ignore_nullable=True)
    assert bot_users(events, 0).count() == 0  # rule off


def test_contribution_weights_cap_null_value_and_absolute_value(spark):
    rows = [
        event("u", "a", "view", "2024-03-10 00:00:00", 7.0),  # view ignores value: 1
        event("u", "b", "purchase", "2024-03-10 00:00:00", 3.0),  # 4 * 3
        event("u", "c", "purchase", "2024-03-10 00:00:00", 25.0),  # 4 * cap 10
        event("u", "d", "purchase", "2024-03-10 00:00:00"),  # null value counts as 1: 4
        event("u", "e", "return", "2024-03-10 00:00:00", -5.0),  # -2 * |-5|, no cap
        event("u", "f", "purchase", "2024-03-10 00:00:00", 0.0),  # 0
    ]
    actual = (
        spark.createDataFrame(rows, CANONICAL)
        .transform(with_contribution(settings(), WINDOW))
        .select("item_id", "contribution")
    )
    expected = spark.createDataFrame(
        [("a", 1.0), ("b", 12.0), ("c", 40.0), ("d", 4.0), ("e", -10.0), ("f", 0.0)],
        "item_id string, contribution double",
    )
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def test_decay_halves_per_half_life_from_the_end_of_the_run_date(spark):
    rows = [
        event("u", "a", "view", "2024-03-10 00:00:00"),  # 1 day before the end of 03-10
        event("u", "b", "view", "2024-03-09 00:00:00"),  # 2 days
        event("u", "c", "view", "2024-03-10 23:59:59.999999"),  # ~0 days
        event("u", "d", "purchase", "2024-03-05 00:00:00", 2.0),  # 6 days, 4 * 2
    ]
    actual = (
        spark.createDataFrame(rows, CANONICAL)
        .transform(with_contribution(settings(half_life_days=2.0), WINDOW))
        .select("item_id", "contribution")
    )
    expected = spark.createDataFrame(
        [("a", 0.5**0.5), ("b", 0.5), ("c", 1.0), ("d", 8.0 * 0.5**3)], "item_id string, contribution double"
    )
    assert_approx_df_equality(actual, expected, precision=1e-9, ignore_row_order=True, ignore_nullable=True)


def test_aggregate_pairs_sums_contributions_including_negative_strength(spark):
    rows = [
        ("u1", "i1", ts("2024-03-02 00:00:00"), 4.0),
        ("u1", "i1", ts("2024-03-05 00:00:00"), -10.0),
        ("u1", "i2", ts("2024-03-03 00:00:00"), 1.0),
        ("u2", "i1", ts("2024-03-04 00:00:00"), 0.1),
        ("u2", "i1", ts("2024-03-04 00:00:00"), 0.2),
    ]
    events = spark.createDataFrame(
        rows, "user_id string, item_id string, event_ts timestamp, contribution double"
    )
    expected = spark.createDataFrame(
        [
            ("u1", "i1", -6.0, 2, ts("2024-03-02 00:00:00"), ts("2024-03-05 00:00:00")),
            ("u1", "i2", 1.0, 1, ts("2024-03-03 00:00:00"), ts("2024-03-03 00:00:00")),
            ("u2", "i1", 0.3, 2, ts("2024-03-04 00:00:00"), ts("2024-03-04 00:00:00")),
        ],
        "user_id string, item_id string, strength float, n_events long, "
        "first_ts timestamp, last_ts timestamp",
    )
    assert_df_equality(aggregate_pairs(events), expected, ignore_row_order=True, ignore_nullable=True)


PAIRS = [  # user a: 3 items, b: 2, c: 1; item x: 3 users, y: 2, z: 1
    ("a", "x"),
    ("a", "y"),
    ("a", "z"),
    ("b", "x"),
    ("b", "y"),
    ("c", "x"),
]


def _pairs(spark, rows):
    return spark.createDataFrame(rows, "user_id string, item_id string")


def test_support_filter_single_pass(spark):
    kept = filter_support(_pairs(spark, PAIRS), 2, 2, k_core=False)
    # users a, b (>= 2 items) and items x, y (>= 2 users), counted on the input
    expected = _pairs(spark, [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")])
    assert_df_equality(kept, expected, ignore_row_order=True, ignore_nullable=True)
    everything = _pairs(spark, PAIRS)
    assert filter_support(everything, 1, 1, k_core=True) is everything  # nothing to filter: no Spark job


def test_k_core_iterates_until_both_minimums_hold(spark):
    rows = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "z"), ("c", "z")]
    # single pass with (2, 2): users a, b; items x, z -> (a,x), (b,x), (b,z): user a has one item left
    single = filter_support(_pairs(spark, rows), 2, 2, k_core=False)
    assert_df_equality(
        single,
        _pairs(spark, [("a", "x"), ("b", "x"), ("b", "z")]),
        ignore_row_order=True,
        ignore_nullable=True,
    )
    # k-core: keeps removing until nothing fails; here everything goes
    assert filter_support(_pairs(spark, rows), 2, 2, k_core=True).count() == 0
    # a 2-core that survives: a square of users {a, b} x items {x, y} plus a dangling pair
    square = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "y")]
    core = filter_support(_pairs(spark, square), 2, 2, k_core=True)
    assert_df_equality(core, _pairs(spark, square[:4]), ignore_row_order=True, ignore_nullable=True)
    core.unpersist()



def test_k_core_cascade_of_many_passes_keeps_the_plan_small(spark, caplog):
    """A chain (user i has items i and i + 1) loses only its two end pairs per pass. A pass reads its
    input three times, so without cutting the plan each pass tripled the plan tree: the sixth pass of this
    chain died of the driver's heap (java.lang.OutOfMemoryError) while Spark analysed it."""
    chain = [(f"u{i:02d}", f"i{j:02d}") for i in range(8) for j in (i, i + 1)]
    square = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    with caplog.at_level(logging.INFO, logger="mf_spark.ingest.rules"):
        core = filter_support(_pairs(spark, chain + square), 2, 2, k_core=True)
    assert_df_equality(core, _pairs(spark, square), ignore_row_order=True, ignore_nullable=True)
    core.unpersist()
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("k-core pass")]
    assert len(passes) == 9 and passes[-1] == "k-core pass 9: 4 -> 4 pairs", passes


@pytest.mark.parametrize(
    "bad",
    [dict(lookback_days=0), dict(half_life_days=-1.0), dict(event_types={}), dict(min_events_per_user=0)],
)
def test_settings_reject_invalid_values(bad):
    with pytest.raises(ValueError):
        settings(**bad)
