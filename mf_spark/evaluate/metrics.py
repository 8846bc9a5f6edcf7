"""Top-K ranking metrics of recommendation lists against held-out interactions, computed in Spark.

Definitions (per user ``u`` with held-out set ``T_u`` and list ``L_u``, ranks 1-based, ``hit_r = 1`` when
the item at rank ``r`` is in ``T_u``; every metric is the mean over the evaluated users):

- ``precision@K = sum_{r<=K} hit_r / K`` (a list shorter than K still divides by K);
- ``recall@K = sum_{r<=K} hit_r / |T_u|``;
- ``capped_recall@K = sum_{r<=K} hit_r / min(K, |T_u|)`` (the "recall" of Liang et al. 2018 and of the iALS
  papers; 1 is reachable for every user);
- ``map@K = sum_{r<=K} hit_r * precision@r / min(K, |T_u|)``;
- ``ndcg@K = DCG@K / IDCG@K`` with binary gains, ``DCG@K = sum_{r<=K} hit_r / log2(r + 1)`` and IDCG the
  DCG of ``min(K, |T_u|)`` hits at the top;
- ``hit_rate@K = 1`` when some ``hit_r = 1`` with ``r <= K``;
- ``mrr@K = 1 / (rank of the first hit)`` when that rank is ``<= K``, else 0;
- ``coverage@K`` = distinct items in all top-K lists / catalogue size (not a per-user mean);
- ``popularity@K`` = mean popularity percentile of the recommended items at ranks ``<= K`` over all list
  entries, where an item's percentile is the fraction of catalogue items whose training interaction
  count is ``<=`` its own (1.0 = the most popular item).

The first four of precision, recall, MAP and NDCG coincide with
:class:`pyspark.ml.evaluation.RankingEvaluator` (``precisionAtK``, ``recallAtK``,
``meanAveragePrecisionAtK``, ``ndcgAtK``); the tests check the agreement. They are computed here
rather than by RankingEvaluator because the paired model comparison needs each user's values
(:func:`per_user_metrics`), RankingEvaluator returns only the mean, and here sums are exact decimals,
so a metric does not change in its last digits with the partitioning. The evaluated users are
exactly the users of the test table: a user without a list (or with an empty one) scores 0.
"""

from __future__ import annotations

import decimal
import logging
import math
from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

PER_USER_METRICS = ("precision", "recall", "capped_recall", "map", "ndcg", "hit_rate", "mrr")
LIST_METRICS = ("coverage", "popularity")
METRICS = PER_USER_METRICS + LIST_METRICS


def metric_name(metric: str, k: int) -> str:
    """``"ndcg", 20 -> "ndcg@20"``, the key used in every metrics dict."""
    return f"{metric}@{k}"


#: Largest cut-off K. Every list is K long and the ideal-DCG table costs about K^2: K = 20,000 spent 80 s
#: before any metric, and K = 2^63 - 1 passed the config and failed after the whole nightly.
MAX_K = 1000


def check_ks(ks: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``ks`` is a non-empty list of cut-offs in 1..:data:`MAX_K`."""
    if not ks or min(ks) < 1 or max(ks) > MAX_K:
        raise ValueError(f"need cut-offs K from 1 to {MAX_K}, got {list(ks)}")


def parse_metric_name(name: str) -> tuple[str, int]:
    """``"ndcg@20" -> ("ndcg", 20)``; raises ``ValueError`` on an unknown metric or a bad K."""
    metric, sep, k_text = name.partition("@")
    if not sep or metric not in METRICS or not k_text.isdigit() or not 1 <= int(k_text) <= MAX_K:
        raise ValueError(f"metric must be name@K with name one of {', '.join(METRICS)} and K from 1 to "
                         f"{MAX_K}, got {name!r}")
    return metric, int(k_text)


def _ideal_dcg_table(spark: SparkSession, max_k: int) -> Column:
    """Literal array whose element ``n`` (1-based) is the DCG of ``n`` hits at the top.

    Computed once by Spark with the expression a list's DCG uses (the same ``log2``, each term at 18
    decimals, summed exactly): with Python's ``log2`` and float sums a perfect list scored
    0.9999999999999998. Evaluating that expression per user instead cost 10x the metric job.
    """
    rows = spark.range(1, max_k + 1).select("id", _ideal_dcg(F.col("id")).alias("dcg")).orderBy("id").collect()
    return F.array(*[F.lit(row["dcg"]) for row in rows])


def _ideal_dcg(n_hits: Column) -> Column:
    """The DCG of ``n_hits`` hits at the top, as a Spark expression summed like a list's DCG."""
    # decimal(30,18) + decimal(20,18) stays within 38 digits, so Spark keeps all 18 decimals
    return F.aggregate(
        F.sequence(F.lit(1), n_hits.cast("int")), F.lit(0).cast("decimal(30,18)"),
        lambda total, rank: (total + (F.lit(1) / F.log2(rank + 1)).cast("decimal(20,18)")).cast("decimal(30,18)"),
    ).cast("double")


def positive_users_per_item(train: DataFrame, item_col: str = "item_idx") -> DataFrame:
    """``item_col``, ``n_users`` long: each training item's count of rows with ``strength > 0``.

    A row with ``strength <= 0`` (a return, a dislike) is a confident "not preferred" to ALS (p = 0, Hu
    et al. 2008) and must not make an item popular; it keeps the item in the catalogue with ``n_users``
    0. Without a ``strength`` column every row counts.
    """
    counted = F.lit(1) if "strength" not in train.columns else F.when(F.col("strength") > 0, 1)
    return train.groupBy(item_col).agg(F.count(counted).alias("n_users"))


def item_popularity_percentile(train: DataFrame, item_col: str = "item_idx") -> DataFrame:
    """Popularity percentile of every training item.

    Parameters
    ----------
    train
        Interactions with ``item_col`` and optionally ``strength``; one row per user-item pair.

    Returns
    -------
    DataFrame
        ``item_col`` int, ``n_users`` long (:func:`positive_users_per_item`), ``percentile`` double in
        (0, 1]: the fraction of catalogue items with ``n_users`` at most this item's.
    """
    counts = positive_users_per_item(train, item_col)
    # A percentile depends only on the item's count, and there are at most about sqrt(2 * interactions)
    # distinct counts, so their cumulative shares are summed on the driver. A cume_dist window over the
    # catalogue gives the same numbers but pulls every item into one partition (Spark's "No Partition
    # Defined for Window operation" warning).
    histogram = sorted(
        (row["n_users"], row["n_items"])
        for row in counts.groupBy("n_users").agg(F.count(F.lit(1)).alias("n_items")).collect()
    )
    n_catalogue = sum(n_items for _, n_items in histogram)
    cumulative, shares = 0, []
    for n_users, n_items in histogram:
        cumulative += n_items
        shares.append((n_users, cumulative / n_catalogue))
    share_table = train.sparkSession.createDataFrame(shares, "n_users long, percentile double")
    return counts.join(F.broadcast(share_table), "n_users").select(item_col, "n_users", "percentile")


#: Sums of metric terms are taken in this type: a decimal sum is exact, so it does not depend on the
#: order Spark adds the rows in (their partitioning, retries). A double sum did, in the last bits, and
#: that broke ties between tuning candidates with the same hits: the pick depended on the partitioning.
EXACT_SUM_TYPE = "decimal(38,18)"


def exact_sum(column: Column) -> Column:
    """``sum`` of a finite double column, exact and independent of row order (18 decimal places)."""
    return F.sum(column.cast(EXACT_SUM_TYPE))


def per_user_metrics(
    recommendations: DataFrame,
    test: DataFrame,
    ks: Sequence[int],
    *,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
    rank_col: str = "rank",
) -> DataFrame:
    """Per-user metric values at each K.

    Parameters
    ----------
    recommendations
        ``user_col``, ``rank_col`` (1-based int), ``item_col``; at most one row per user and rank.
    test
        Held-out ``user_col``, ``item_col`` pairs (duplicates are ignored).
    ks
        Cut-offs.

    Returns
    -------
    DataFrame
        One row per test user: ``user_col``, ``n_test`` and one double column per metric and K,
        named ``precision@10`` and so on (``PER_USER_METRICS``).
    """
    ks = sorted(set(int(k) for k in ks))
    max_k = ks[-1]
    relevant = test.select(user_col, item_col).distinct()
    test_sizes = relevant.groupBy(user_col).agg(F.count(F.lit(1)).alias("n_test"))
    hits = (
        recommendations.where(F.col(rank_col) <= max_k)
        .select(user_col, item_col, F.col(rank_col).cast("int").alias("rank"))
        .join(relevant.withColumn("hit", F.lit(1)), [user_col, item_col], "left")
        .withColumn("hit", F.coalesce("hit", F.lit(0)))
        .withColumn(
            "hits_so_far",
            F.sum("hit").over(
                Window.partitionBy(user_col).orderBy("rank").rowsBetween(Window.unboundedPreceding, 0)
            ),
        )
    )
    sums = []
    for k in ks:
        within = F.col("rank") <= k
        sums += [
            F.sum(F.when(within, F.col("hit")).otherwise(0)).alias(f"_hits{k}"),
            exact_sum(F.when(within, F.col("hit") / F.log2(F.col("rank") + 1)).otherwise(0.0)).alias(f"_dcg{k}"),
            exact_sum(
                F.when(within & (F.col("hit") == 1), F.col("hits_so_far") / F.col("rank")).otherwise(0.0)
            ).alias(f"_ap{k}"),
        ]
    sums.append(F.min(F.when(F.col("hit") == 1, F.col("rank"))).alias("_first_hit"))
    per_user_sums = hits.groupBy(user_col).agg(*sums)

    ideal = _ideal_dcg_table(test.sparkSession, max_k)
    joined = test_sizes.join(per_user_sums, user_col, "left")
    columns = [F.col(user_col), F.col("n_test")]
    for k in ks:
        hit_count = F.coalesce(F.col(f"_hits{k}"), F.lit(0)).cast("double")
        capped = F.least(F.lit(k), F.col("n_test"))
        columns += [
            (hit_count / k).alias(metric_name("precision", k)),
            (hit_count / F.col("n_test")).alias(metric_name("recall", k)),
            (hit_count / capped).alias(metric_name("capped_recall", k)),
            (F.coalesce(F.col(f"_ap{k}").cast("double"), F.lit(0.0)) / capped).alias(metric_name("map", k)),
            (
                F.coalesce(F.col(f"_dcg{k}").cast("double"), F.lit(0.0)) / F.element_at(ideal, capped.cast("int"))
            ).alias(metric_name("ndcg", k)),
            (hit_count > 0).cast("double").alias(metric_name("hit_rate", k)),
            F.when(F.col("_first_hit") <= k, 1.0 / F.col("_first_hit"))
            .otherwise(0.0)
            .alias(metric_name("mrr", k)),
        ]
    return joined.select(*columns)


# two-sided 95% quantile of the standard normal
Z_95 = 1.959963984540054


def paired_differences(
    per_user_a: DataFrame, per_user_b: DataFrame, names: Sequence[str], *, user_col: str = "user_idx"
) -> dict[str, dict[str, float]]:
    """Mean per-user difference ``a - b`` of each metric, with a 95% interval over the test users.

    Both models are scored on the same users, so the interval is paired: ``mean +- 1.96 * sd / sqrt(n)``
    of the per-user differences (normal approximation, sound for the hundreds of users an evaluation
    has). It covers only which users are in the test set, not the seed of the initial factors nor the
    choice of parameters.

    Parameters
    ----------
    per_user_a, per_user_b
        Outputs of :func:`per_user_metrics` for two models on the same test table (one row per user).
    names
        Metric columns, e.g. ``["ndcg@20", "recall@20"]``.

    Returns
    -------
    dict
        ``name -> {"mean", "low", "high", "n_users"}``; with fewer than two users the interval is the mean.
    """
    pairs = per_user_a.select(user_col, *[F.col(f"`{n}`").alias(f"a{i}") for i, n in enumerate(names)]).join(
        per_user_b.select(user_col, *[F.col(f"`{n}`").alias(f"b{i}") for i, n in enumerate(names)]), user_col
    )
    # Exact sums of the differences and of their squares (F.avg and F.stddev_samp add doubles in arrival
    # order, so the interval changed in its last digits with the partitioning); mean and sd from them.
    aggregates = [F.count(F.lit(1)).alias("n")]
    for i in range(len(names)):
        difference = F.col(f"a{i}") - F.col(f"b{i}")
        aggregates += [exact_sum(difference).alias(f"sum{i}"), exact_sum(difference * difference).alias(f"squares{i}")]
    row = pairs.agg(*aggregates).first()
    n = int(row["n"])
    result = {}
    for i, name in enumerate(names):
        if n == 0:  # no shared user: no difference to report (the metrics themselves are NaN)
            result[name] = {"mean": math.nan, "low": math.nan, "high": math.nan, "n_users": 0}
            continue
        total, squares = row[f"sum{i}"], row[f"squares{i}"]  # Decimal
        with decimal.localcontext() as exact:
            exact.prec = 100  # total * total needs more than the default 28 digits
            mean = float(total / n)
            variance = float((squares - total * total / n) / (n - 1)) if n > 1 else 0.0
        half_width = Z_95 * math.sqrt(max(variance, 0.0)) / math.sqrt(n) if n > 1 else 0.0
        result[name] = {"mean": mean, "low": mean - half_width, "high": mean + half_width, "n_users": n}
    return result


def list_metrics(
    recommendations: DataFrame,
    popularity: DataFrame,
    ks: Sequence[int],
    *,
    item_col: str = "item_idx",
    rank_col: str = "rank",
    catalogue_size: int | None = None,
) -> dict[str, float]:
    """Catalogue coverage and mean popularity percentile of the lists at each K.

    Parameters
    ----------
    recommendations
        ``item_col``, ``rank_col`` (1-based) for the evaluated users.
    popularity
        Output of :func:`item_popularity_percentile` on the training data (``item_col``, ``percentile``).
    catalogue_size
        Denominator of the coverage; defaults to the number of rows of ``popularity``.

    Returns
    -------
    dict
        ``coverage@K`` and ``popularity@K`` for each K (0.0 when there are no lists).
    """
    ks = sorted(set(int(k) for k in ks))
    n_catalogue = catalogue_size if catalogue_size is not None else popularity.count()
    scored = recommendations.select(item_col, rank_col).join(
        popularity.select(item_col, "percentile"), item_col, "left"
    )
    aggregates = []
    for k in ks:
        within = F.col(rank_col) <= k
        aggregates += [
            F.count_distinct(F.when(within, F.col(item_col))).alias(metric_name("coverage", k)),
            exact_sum(F.when(within, F.coalesce("percentile", F.lit(0.0)))).alias(metric_name("popularity", k)),
            F.count(F.when(within, 1)).alias(f"_entries{k}"),
        ]
    row = scored.agg(*aggregates).first()
    result: dict[str, float] = {}
    for k in ks:
        covered = row[metric_name("coverage", k)] or 0
        result[metric_name("coverage", k)] = covered / n_catalogue if n_catalogue else 0.0
        entries = row[f"_entries{k}"]
        total = row[metric_name("popularity", k)]
        result[metric_name("popularity", k)] = float(total / entries) if entries else 0.0
    return result


def ranking_metrics(
    recommendations: DataFrame,
    test: DataFrame,
    ks: Sequence[int],
    *,
    popularity: DataFrame | None = None,
    catalogue_size: int | None = None,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
    rank_col: str = "rank",
    per_user: DataFrame | None = None,
) -> dict[str, float]:
    """All metrics at every K, averaged over the users of ``test``.

    Parameters
    ----------
    recommendations
        ``user_col``, ``rank_col`` (1-based), ``item_col``: the lists, already without training items.
    test
        Held-out ``user_col``, ``item_col`` pairs; its users are the evaluated users.
    popularity
        :func:`item_popularity_percentile` of the training data; without it coverage and popularity are
        left out.
    catalogue_size
        Coverage denominator; defaults to the rows of ``popularity``.
    per_user
        :func:`per_user_metrics` of these lists and ``test`` at ``ks``, when the caller already has it
        (e.g. persisted for :func:`paired_differences`); computed here otherwise.

    Returns
    -------
    dict
        ``"<metric>@<K>" -> float`` plus ``"n_users"``, the number of evaluated users; the per-user
        metrics are NaN when no user was evaluated.
    """
    ks = sorted(set(int(k) for k in ks))
    if per_user is None:
        per_user = per_user_metrics(
            recommendations, test, ks, user_col=user_col, item_col=item_col, rank_col=rank_col
        )
    names = [metric_name(m, k) for k in ks for m in PER_USER_METRICS]
    row = per_user.agg(
        F.count(F.lit(1)).alias("n_users"), *[exact_sum(F.col(f"`{n}`")).alias(n) for n in names]
    ).first()
    n_users = int(row["n_users"])
    result: dict[str, float] = {"n_users": n_users}
    for name in names:
        # NaN over no user, not 0.0: the quality gate fails a NaN ("no test user scored?") but passed a
        # 0.0 whenever its minimum was 0 or there was no previous run
        result[name] = float("nan") if row[name] is None else float(row[name] / n_users)
    if popularity is not None:
        test_users = test.select(user_col).distinct()
        evaluated_lists = recommendations.join(test_users, user_col, "left_semi")
        result.update(
            list_metrics(
                evaluated_lists,
                popularity,
                ks,
                item_col=item_col,
                rank_col=rank_col,
                catalogue_size=catalogue_size,
            )
        )
    return result
