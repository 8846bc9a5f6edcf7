"""Ranking metrics: hand-computed tiny cases and agreement with RankingEvaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pyspark.ml.evaluation import RankingEvaluator
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from mf_spark.evaluate.metrics import (
    item_popularity_percentile,
    paired_differences,
    parse_metric_name,
    per_user_metrics,
    ranking_metrics,
)


def _recs(spark, lists: dict[int, list[int]]):
    rows = [(u, r, i) for u, items in lists.items() for r, i in enumerate(items, start=1)]
    return spark.createDataFrame(rows, "user_idx int, rank int, item_idx int")


def _test(spark, sets: dict[int, list[int]]):
    return spark.createDataFrame(
        [(u, i) for u, items in sets.items() for i in items], "user_idx int, item_idx int"
    )


@pytest.fixture(scope="module")
def tiny(spark):
    # user 1: hits at ranks 2 and 4, one test item never recommended; user 2: a list shorter than K;
    # user 3: no list at all (an empty list scores 0, it is not dropped)
    recs = _recs(spark, {1: [10, 11, 12, 13], 2: [20], 4: [40]})
    test = _test(spark, {1: [11, 13, 99], 2: [20], 3: [30, 31]})
    return recs, test


def test_hand_computed_values(spark, tiny):
    recs, test = tiny
    by_user = {r["user_idx"]: r.asDict() for r in per_user_metrics(recs, test, [2, 4]).collect()}
    assert set(by_user) == {1, 2, 3}, "users without test items are not evaluated; users without lists are"
    u1, u2, u3 = by_user[1], by_user[2], by_user[3]
    d1, d2, d3, d4 = (1 / math.log2(r + 1) for r in (1, 2, 3, 4))  # discounts of ranks 1..4
    expected_u1 = {
        "precision@2": 0.5,
        "recall@2": 1 / 3,
        "capped_recall@2": 0.5,
        "map@2": 0.5 / 2,
        "ndcg@2": d2 / (d1 + d2),
        "hit_rate@2": 1.0,
        "mrr@2": 0.5,
        "precision@4": 0.5,
        "recall@4": 2 / 3,
        "capped_recall@4": 2 / 3,
        "map@4": (1 / 2 + 2 / 4) / 3,
        "ndcg@4": (d2 + d4) / (d1 + d2 + d3),
        "hit_rate@4": 1.0,
        "mrr@4": 0.5,
    }
    for name, value in expected_u1.items():
        assert u1[name] == pytest.approx(value), name
    expected_u2 = {
        "precision@2": 0.5,
        "precision@4": 0.25,
        "recall@4": 1.0,
        "capped_recall@4": 1.0,
        "map@4": 1.0,
        "ndcg@4": 1.0,
        "hit_rate@2": 1.0,
        "mrr@4": 1.0,
    }
    for name, value in expected_u2.items():
        assert u2[name] == pytest.approx(value), name
    assert all(u3[n] == 0.0 for n in u3 if "@" in n)
    assert u3["n_test"] == 2


def test_averages_over_test_users(spark, tiny):
    recs, test = tiny
    metrics = ranking_metrics(recs, test, [4, 2])
    assert metrics["n_users"] == 3
    assert metrics["precision@2"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert metrics["recall@4"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert metrics["mrr@2"] == pytest.approx((0.5 + 1.0) / 3)


def test_no_lists_at_all_scores_zero(spark, tiny):
    _, test = tiny
    empty = spark.createDataFrame([], "user_idx int, rank int, item_idx int")
    metrics = ranking_metrics(empty, test, [2])
    assert metrics["n_users"] == 3
    assert all(v == 0.0 for k, v in metrics.items() if "@" in k)


def test_no_test_user_gives_nan_and_fails_the_gate(spark, tiny):
    """Every metric was 0.0 over no user, which passed a gate with min_value 0 (or no previous run)."""
    from mf_spark.evaluate import evaluate_gate

    lists, test = tiny
    metrics = ranking_metrics(lists, test.limit(0), [2])
    assert metrics["n_users"] == 0
    assert all(math.isnan(v) for k, v in metrics.items() if "@" in k)
    gate = evaluate_gate({"primary_model": "m", "models": {"m": {"metrics": metrics}}}, None, "ndcg@2",
                         min_value=0.0, max_relative_drop=0.5)
    assert not gate.passed and "no test user scored" in gate.reason


def test_coverage_and_popularity(spark):
    # item 1 in 3 users' training rows, item 2 in 2, item 3 in 1, item 4 in 1: cume_dist 1, .75, .5, .5
    train = _test(spark, {1: [1, 2, 3], 2: [1, 2, 4], 3: [1]})
    popularity = {r["item_idx"]: r["percentile"] for r in item_popularity_percentile(train).collect()}
    assert popularity == pytest.approx({1: 1.0, 2: 0.75, 3: 0.5, 4: 0.5})
    recs = _recs(spark, {1: [4, 1], 2: [3, 1], 9: [2, 2]})  # user 9 has no test rows: not counted
    test = _test(spark, {1: [5], 2: [6]})
    metrics = ranking_metrics(recs, test, [1, 2], popularity=item_popularity_percentile(train))
    assert metrics["coverage@1"] == pytest.approx(2 / 4)
    assert metrics["coverage@2"] == pytest.approx(3 / 4)
    assert metrics["popularity@1"] == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["popularity@2"] == pytest.approx((0.5 + 1.0 + 0.5 + 1.0) / 4)


def test_popularity_percentile_counts_positive_rows_only(spark):
    train = spark.createDataFrame(
        [(1, 1, 1.0), (2, 1, 1.0), (1, 2, -1.0), (2, 2, -1.0), (3, 2, 2.0), (3, 3, 0.0)],
        "user_idx int, item_idx int, strength float",
    )
    rows = {r["item_idx"]: (r["n_users"], r["percentile"]) for r in item_popularity_percentile(train).collect()}
    assert rows == {1: (2, pytest.approx(1.0)), 2: (1, pytest.approx(2 / 3)), 3: (0, pytest.approx(1 / 3))}


def test_popularity_percentile_is_cume_dist_without_a_global_window(spark):
    # ties, a long tail and one very popular item
    lists = {u: [1] + [2 + (u * j) % 37 for j in range(1 + u % 7)] for u in range(1, 60)}
    train = _test(spark, {u: list(dict.fromkeys(items)) for u, items in lists.items()})
    percentiles = item_popularity_percentile(train)
    expected = (
        train.groupBy("item_idx")
        .agg(F.count(F.lit(1)).alias("n_users"))
        .withColumn("percentile", F.cume_dist().over(Window.orderBy("n_users")))
    )
    assertDataFrameEqual(percentiles, expected, rtol=1e-12)
    # the warning this avoids: a window with no partition moves the whole catalogue into one task
    assert "Window" not in percentiles._jdf.queryExecution().executedPlan().toString()
    assert item_popularity_percentile(train.limit(0)).count() == 0


def test_agrees_with_ranking_evaluator(spark):
    lists = {u: [(u * 7 + j * 3) % 23 for j in range(12)] for u in range(1, 30)}
    lists = {u: list(dict.fromkeys(items)) for u, items in lists.items()}  # distinct, order kept
    relevant = {u: [(u * 5 + j) % 23 for j in range(1 + u % 9)] for u in range(1, 30)}
    recs, test = _recs(spark, lists), _test(spark, relevant)
    ks = [1, 3, 5, 10, 20]
    ours = ranking_metrics(recs, test, ks)
    as_arrays = (
        recs.groupBy("user_idx")
        .agg(F.sort_array(F.collect_list(F.struct("rank", "item_idx"))).alias("ranked"))
        .select("user_idx", F.transform("ranked", lambda s: s["item_idx"].cast("double")).alias("prediction"))
        .join(
            test.groupBy("user_idx").agg(F.collect_set(F.col("item_idx").cast("double")).alias("label")),
            "user_idx",
        )
    )
    names = {
        "precisionAtK": "precision",
        "recallAtK": "recall",
        "ndcgAtK": "ndcg",
        "meanAveragePrecisionAtK": "map",
    }
    for spark_name, our_name in names.items():
        for k in ks:
            theirs = RankingEvaluator(metricName=spark_name, k=k).evaluate(as_arrays)
            assert ours[f"{our_name}@{k}"] == pytest.approx(theirs, abs=1e-12), (spark_name, k)


def test_parse_metric_name():
    assert parse_metric_name("ndcg@20") == ("ndcg", 20)
    for bad in ("ndcg", "ndcg@0", "auc@10", "ndcg@x"):
        with pytest.raises(ValueError):
            parse_metric_name(bad)


def test_paired_differences_against_numpy(spark):
    import numpy as np

    a = {1: (0.5, 1.0), 2: (0.0, 0.0), 3: (1.0, 0.5), 4: (0.25, 0.25), 9: (1.0, 1.0)}
    b = {1: (0.25, 1.0), 2: (0.5, 0.5), 3: (1.0, 0.0), 4: (0.0, 0.25), 8: (0.0, 0.0)}  # 8, 9: one side only
    schema = "user_idx int, `ndcg@2` double, `recall@2` double"
    frame_a = spark.createDataFrame([(u, *v) for u, v in a.items()], schema)
    frame_b = spark.createDataFrame([(u, *v) for u, v in b.items()], schema)
    got = paired_differences(frame_a, frame_b, ["ndcg@2", "recall@2"])
    for column, name in enumerate(["ndcg@2", "recall@2"]):
        d = np.array([a[u][column] - b[u][column] for u in (1, 2, 3, 4)])
        half = 1.959963984540054 * d.std(ddof=1) / np.sqrt(len(d))
        assert got[name] == pytest.approx({"mean": d.mean(), "low": d.mean() - half, "high": d.mean() + half,
                                           "n_users": 4})
    one_user = paired_differences(frame_a.where("user_idx = 1"), frame_b, ["ndcg@2"])["ndcg@2"]
    assert one_user == pytest.approx({"mean": 0.25, "low": 0.25, "high": 0.25, "n_users": 1})
    # no shared user: no difference, not a certain 0 ("+0.0000 [+0.0000, +0.0000]" in report.md)
    none = paired_differences(frame_a.where("user_idx = 9"), frame_b, ["ndcg@2"])["ndcg@2"]
    assert none["n_users"] == 0 and all(math.isnan(none[key]) for key in ("mean", "low", "high"))


def test_paired_differences_do_not_depend_on_partitioning(spark):
    """F.avg and F.stddev_samp added doubles in arrival order: the interval in metrics.json changed in its
    last digits with the number of partitions."""
    rng = np.random.default_rng(5)
    n = 400
    schema = "user_idx int, `ndcg@20` double"
    a = spark.createDataFrame([(u, float(v)) for u, v in enumerate(rng.random(n))], schema)
    b = spark.createDataFrame([(u, float(v)) for u, v in enumerate(rng.random(n))], schema)
    results = [paired_differences(a.repartition(p), b.repartition(p), ["ndcg@20"]) for p in (1, 3, 7, 16)]
    assert all(r == results[0] for r in results[1:])  # bit for bit


def test_a_perfect_list_scores_ndcg_exactly_one(spark):
    """The ideal DCG used Python's log2 and float sums, the list's DCG Spark's log2 and exact sums: a perfect
    list scored 0.9999999999999998 at K = 3, 7 and 10 (a gate with min_value = 1 failed it)."""
    ks = [1, 3, 7, 10, 20]
    recs = spark.createDataFrame([(0, r, r) for r in range(1, 21)], "user_idx int, rank int, item_idx int")
    test = spark.createDataFrame([(0, i) for i in range(1, 21)], "user_idx int, item_idx int")
    row = per_user_metrics(recs, test, ks).first()
    assert [row[f"ndcg@{k}"] for k in ks] == [1.0] * len(ks)


def _lists_with_hits(spark, hits_per_user, k, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for user, hits in enumerate(hits_per_user):
        items = list(range(hits)) + list(range(1000, 1000 + k - hits))
        rng.shuffle(items)
        rows += [(user, rank, item) for rank, item in enumerate(items, start=1)]
    return spark.createDataFrame(rows, "user_idx int, rank int, item_idx int")


def test_metric_means_do_not_depend_on_partitioning(spark):
    """Double sums depended on the order Spark added rows in: two lists with the same hits had
    precision@20 differing in the last bits, and which one tuning picked changed with the partitioning."""
    k, n_users = 20, 150
    rng = np.random.default_rng(11)
    hits_a = np.minimum(rng.multinomial(700, np.ones(n_users) / n_users), k)
    hits_b = hits_a[rng.permutation(n_users)]  # the same total, spread over other users
    test = spark.createDataFrame([(u, i) for u in range(n_users) for i in range(30)], "user_idx int, item_idx int")
    lists = [_lists_with_hits(spark, hits_a, k, 1), _lists_with_hits(spark, hits_b, k, 2)]
    previous = spark.conf.get("spark.sql.shuffle.partitions")
    results = []
    try:
        for shuffle, partitions in [("2", 1), ("3", 7), ("7", 7)]:
            spark.conf.set("spark.sql.shuffle.partitions", shuffle)
            results.append([ranking_metrics(recs.repartition(partitions), test.repartition(partitions), [k, 5])
                            for recs in lists])
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)
    assert all(r == results[0] for r in results[1:])  # every value, bit for bit
    a, b = results[0]
    assert a["precision@20"] == b["precision@20"] == hits_a.sum() / (n_users * k)


def test_duplicate_test_pairs_count_once(spark):
    recs = spark.createDataFrame([(1, 1, 10), (1, 2, 11), (1, 3, 12), (1, 4, 13)], "user_idx int, rank int, item_idx int")
    test = spark.createDataFrame([(1, 11), (1, 11), (1, 13), (1, 99)], "user_idx int, item_idx int")
    row = per_user_metrics(recs, test, [4]).first()
    assert row["n_test"] == 3 and row["recall@4"] == pytest.approx(2 / 3) and row["precision@4"] == 0.5


def test_items_without_a_popularity_percentile_count_zero(spark):
    """A list of only items unknown to training gave popularity@K None / n (a TypeError)."""
    train = spark.createDataFrame([(1, 1), (2, 1), (2, 2)], "user_idx int, item_idx int")
    recs = spark.createDataFrame([(1, 1, 7), (1, 2, 1)], "user_idx int, rank int, item_idx int")
    test = spark.createDataFrame([(1, 5)], "user_idx int, item_idx int")
    metrics = ranking_metrics(recs, test, [1, 2], popularity=item_popularity_percentile(train))
    assert metrics["popularity@1"] == 0.0 and metrics["popularity@2"] == pytest.approx(0.5)
