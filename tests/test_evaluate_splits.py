"""Splits: determinism (twice, and after repartitioning), no leakage, sizes, cold users; baselines."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from mf_spark.errors import InputDataError
from mf_spark.evaluate.baselines import most_popular, random_items
from mf_spark.evaluate.splits import SPLITS, make_split

BASE = dt.datetime(2024, 1, 1)


@pytest.fixture(scope="module")
def interactions(spark):
    # 12 users with 1..12 interactions each over 30 items; user 5's rows share one timestamp (a tie)
    rows = []
    for user in range(1, 13):
        for j in range(user):
            item = (user * 7 + j * 5) % 30
            ts = BASE + dt.timedelta(days=0 if user == 5 else j * 3 + user % 4)
            rows.append((user, item, float(j + 1), 1, ts, ts))
    return spark.createDataFrame(
        rows,
        "user_idx int, item_idx int, strength float, n_events long, first_ts timestamp, last_ts timestamp",
    ).dropDuplicates(["user_idx", "item_idx"])


SETTINGS = {"test_fraction": 0.25, "cutoff_date": "2024-01-12", "holdout_users": 3, "seed": 11}


def _pairs(df):
    return sorted((r["user_idx"], r["item_idx"]) for r in df.select("user_idx", "item_idx").collect())


@pytest.mark.parametrize("protocol", SPLITS)
def test_split_is_deterministic_and_disjoint(interactions, protocol):
    first = make_split(interactions, protocol, **SETTINGS)
    again = make_split(
        interactions.repartition(5, "item_idx").sortWithinPartitions(F.rand(3)), protocol, **SETTINGS
    )
    for part in ("train", "test", "fold_in", "cold_test"):
        a, b = getattr(first, part), getattr(again, part)
        assert (a is None) == (b is None)
        if a is not None:
            assertDataFrameEqual(a, b)
    train, test = set(_pairs(first.train)), set(_pairs(first.test))
    fold_in = set(_pairs(first.fold_in)) if first.fold_in is not None else set()
    cold = set(_pairs(first.cold_test)) if first.cold_test is not None else set()
    assert not train & test and not fold_in & test and not train & fold_in and not cold & (train | test)
    assert train | test | fold_in | cold == set(_pairs(interactions)), "every interaction lands in one part"
    # every evaluated user has history to be scored from
    history_users = {u for u, _ in train | fold_in}
    assert {u for u, _ in test} <= history_users


def test_user_temporal_takes_the_latest_with_item_ties(interactions):
    split = make_split(interactions, "user_temporal", test_fraction=0.25)
    test = _pairs(split.test)
    counts = split.counts()
    assert counts["test_users"] == 11, "user 1 has one interaction and keeps it in training"
    for user in range(2, 13):
        rows = [r for r in interactions.where(F.col("user_idx") == user).collect()]
        rows.sort(key=lambda r: (r["last_ts"], r["item_idx"]))
        n_test = min(max(int(len(rows) * 0.25 + 0.5), 1), len(rows) - 1)  # Spark rounds half up
        assert [(user, r["item_idx"]) for r in rows[-n_test:]] == [p for p in test if p[0] == user]
    # user 5: all timestamps equal, so the largest item ids are the latest
    user5 = sorted(r["item_idx"] for r in interactions.where("user_idx = 5").collect())
    assert [i for u, i in test if u == 5] == user5[-1:]


def test_test_n_and_random_seed(interactions):
    by_n = make_split(interactions, "user_random", test_n=2, seed=1)
    per_user = {r["user_idx"]: r["count"] for r in by_n.test.groupBy("user_idx").count().collect()}
    assert per_user == {1 + 1: 1, **{u: 2 for u in range(3, 13)}}
    other_seed = make_split(interactions, "user_random", test_n=2, seed=2)
    assert _pairs(by_n.test) != _pairs(other_seed.test)


def test_global_temporal_reports_cold_users(interactions, spark):
    newcomer = spark.createDataFrame(
        [(99, 3, 1.0, 1, BASE + dt.timedelta(days=40), BASE + dt.timedelta(days=40)),
         (1, 29, 1.0, 1, None, None)],  # no time (an external table): it was dropped from both parts
        interactions.schema,
    )
    split = make_split(interactions.unionByName(newcomer), "global_temporal", cutoff_date="2024-01-12")
    assert (1, 29) in _pairs(split.train)
    counts = split.counts()
    assert counts["cold_test_users"] >= 1 and 99 in {u for u, _ in _pairs(split.cold_test)}
    assert 99 not in {u for u, _ in _pairs(split.test)}
    cutoff = dt.datetime(2024, 1, 13)
    assert all(r["last_ts"] is None or r["last_ts"] < cutoff for r in split.train.collect())
    assert split.test.count() > 0 and all(r["last_ts"] >= cutoff for r in split.test.collect())


def test_strong_generalization_holds_users_out(interactions):
    split = make_split(interactions, "strong_generalization", holdout_users=3, test_fraction=0.25, seed=11)
    held = {u for u, _ in _pairs(split.fold_in)}
    assert len(held) == 3
    assert not held & {u for u, _ in _pairs(split.train)}
    assert {u for u, _ in _pairs(split.test)} <= held
    assert split.counts()["fold_in_interactions"] == len(_pairs(split.fold_in))


def test_counts_unseen_items(spark):
    rows = [(1, 1), (1, 2), (2, 1), (2, 3)]
    df = spark.createDataFrame(rows, "user_idx int, item_idx int")
    split = make_split(df, "user_random", test_n=1, seed=0)
    counts = split.counts()
    train_items = {i for _, i in _pairs(split.train)}
    unseen = [p for p in _pairs(split.test) if p[1] not in train_items]
    assert counts["test_interactions_unseen_items"] == len(unseen)
    assert counts["test_items_unseen_in_train"] == len({i for _, i in unseen})


def test_dislikes_are_not_relevant(spark):
    # strength < 0 is a confident dislike: held out like any row, never counted as a hit
    t1, t2 = BASE, BASE + dt.timedelta(days=1)
    rows = [(1, 1, 2.0, t1), (1, 2, -1.0, t2), (2, 1, 1.0, t1), (2, 3, 1.0, t2)]
    df = spark.createDataFrame(rows, "user_idx int, item_idx int, strength float, last_ts timestamp")
    split = make_split(df, "user_temporal", test_n=1)
    assert _pairs(split.test) == [(1, 2), (2, 3)]
    assert _pairs(split.relevant) == [(2, 3)]
    counts = split.counts()
    assert counts["test_interactions"] == 1 and counts["test_users"] == 1
    assert counts["test_interactions_not_positive"] == 1


def test_temporal_splits_place_a_pair_by_its_first_interaction(spark):
    """A pair bought before the cutoff and again after it went to test whole (by last_ts): it left the
    user's history and seen items and counted as a hit production never shows (it excludes seen items)."""
    day = lambda d: BASE + dt.timedelta(days=d)  # noqa: E731
    rows = [(1, 10, 1.0, day(1), day(20)),  # first met before, bought again after the cutoff
            (1, 11, 1.0, day(2), day(2)),
            (1, 12, 1.0, day(15), day(15)),  # first met after: the future
            (2, 10, 1.0, day(3), day(3))]
    schema = "user_idx int, item_idx int, strength float, first_ts timestamp, last_ts timestamp"
    df = spark.createDataFrame(rows, schema)
    split = make_split(df, "global_temporal", cutoff_date=day(10).date())
    assert _pairs(split.test) == [(1, 12)] and (1, 10) in _pairs(split.train)
    latest = make_split(df, "user_temporal", test_n=1)
    assert _pairs(latest.test) == [(1, 12)]  # by last_ts it was item 10
    # a table with last_ts only (an external --interactions table) is placed by it
    only_last = df.drop("first_ts")
    assert _pairs(make_split(only_last, "global_temporal", cutoff_date=day(10).date()).test) == [(1, 10), (1, 12)]


def test_missing_time_column_names_it(spark):
    df = spark.createDataFrame([(1, 1)], "user_idx int, item_idx int")
    with pytest.raises(InputDataError, match="first_ts or last_ts"):
        make_split(df, "user_temporal")


@pytest.mark.parametrize("protocol", SPLITS)
def test_missing_id_column_names_it(interactions, protocol):
    no_item = interactions.withColumnRenamed("item_idx", "item")
    with pytest.raises(InputDataError, match=r"^interactions: table has no column 'item_idx' \(columns: user_idx, item, "):
        make_split(no_item, protocol, **SETTINGS)


def test_most_popular_excludes_seen_and_breaks_ties_by_item(spark):
    train = spark.createDataFrame(
        [(1, 5), (2, 5), (3, 5), (1, 7), (2, 7), (3, 2), (2, 9)], "user_idx int, item_idx int"
    )
    users = spark.createDataFrame([(1,), (4,)], "user_idx int")
    recs = {(r["user_idx"], r["rank"]): r["item_idx"] for r in most_popular(train, users, 3).collect()}
    # popularity: 5 (3 users), 7 (2), then 2 and 9 tied with 1 user each: 2 first
    assert [recs[(4, r)] for r in (1, 2, 3)] == [5, 7, 2]
    assert [recs[(1, r)] for r in (1, 2)] == [2, 9] and (1, 3) not in recs


def test_most_popular_counts_positive_rows_only(spark):
    """A return (strength <= 0) is a confident "not preferred" to ALS; counting it made a much-returned
    item the most popular."""
    train = spark.createDataFrame(
        [(1, 5, -1.0), (2, 5, -2.0), (3, 5, 0.0), (1, 7, 1.0), (2, 7, 3.0), (3, 2, 1.0)],
        "user_idx int, item_idx int, strength float",
    )
    users = spark.createDataFrame([(4,)], "user_idx int")
    recs = most_popular(train, users, 3).orderBy("rank").collect()
    assert [(r["item_idx"], r["score"]) for r in recs] == [(7, 2.0), (2, 1.0), (5, 0.0)]


def test_random_is_seeded_and_excludes_seen(spark):
    seen = spark.createDataFrame([(1, i) for i in range(0, 20, 2)], "user_idx int, item_idx int")
    catalogue = spark.range(20).select(F.col("id").cast("int").alias("item_idx"))
    users = spark.createDataFrame([(1,), (2,)], "user_idx int")
    first = random_items(catalogue, users, 5, seen=seen, seed=3)
    again = random_items(catalogue, users.repartition(2), 5, seen=seen, seed=3)
    assertDataFrameEqual(first, again)
    rows = first.collect()
    # user 1 (the one with seen items) still gets a full list: five distinct unseen (odd) items
    user1 = [r for r in rows if r["user_idx"] == 1]
    assert sorted(r["rank"] for r in user1) == [1, 2, 3, 4, 5] and len({r["item_idx"] for r in user1}) == 5
    assert all(r["item_idx"] % 2 == 1 for r in user1)
    assert sorted(r["rank"] for r in rows if r["user_idx"] == 2) == [1, 2, 3, 4, 5]
    assert len({r["item_idx"] for r in rows if r["user_idx"] == 2}) == 5
    assert _pairs(first) != _pairs(random_items(catalogue, users, 5, seen=seen, seed=4))


def test_global_temporal_cuts_at_the_utc_day_whatever_the_session_zone(spark):
    """The cutoff was midnight in the session time zone: under America/New_York a pair first met at
    00:30 UTC the day after the cutoff was training data (the docs say UTC days)."""
    after = [dt.datetime(2024, 6, 2, 0, 0, tzinfo=dt.UTC), dt.datetime(2024, 6, 2, 0, 30, tzinfo=dt.UTC)]
    before = dt.datetime(2024, 6, 1, 23, 59, tzinfo=dt.UTC)
    rows = [(1, item, 1.0, 1, ts, ts) for item, ts in enumerate([before, *after])]
    zone = spark.conf.get("spark.sql.session.timeZone")
    try:
        for session_zone in ("America/New_York", "Asia/Tokyo", "UTC"):
            spark.conf.set("spark.sql.session.timeZone", session_zone)
            frame = spark.createDataFrame(rows, "user_idx int, item_idx int, strength float, n_events long, "
                                                "first_ts timestamp, last_ts timestamp")
            split = make_split(frame, "global_temporal", cutoff_date="2024-06-01")
            assert (_pairs(split.train), _pairs(split.test)) == ([(1, 0)], [(1, 1), (1, 2)]), session_zone
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)


@pytest.mark.parametrize("text", ["2024-W22", "20240601", "2024W226", "2024-6-1"])
def test_a_cutoff_date_in_another_iso_form_is_refused(interactions, text):
    """date.fromisoformat took ISO week dates and the compact form: '2024-W22' became 2024-05-27."""
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        make_split(interactions, "global_temporal", cutoff_date=text)
