"""Non-personalised baselines: most popular and seeded random, both excluding each user's seen items.

Both score per user in ``mapInPandas`` with the catalogue broadcast as a NumPy array: the popular list is
one array in popularity order, the random list draws from a generator seeded by ``(seed, user_idx)`` so a
user's list does not depend on partitioning or on retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mf_spark.evaluate.metrics import positive_users_per_item

log = logging.getLogger(__name__)

USER, ITEM = "user_idx", "item_idx"
RECOMMENDATION_SCHEMA = "user_idx int, rank int, item_idx int, score float"


def _seen_lists(users: DataFrame, seen: DataFrame) -> DataFrame:
    """``user_idx``, ``seen`` array<int> (possibly empty) for each row of ``users``."""
    seen_by_user = seen.groupBy(USER).agg(F.collect_set(F.col(ITEM).cast("int")).alias("seen"))
    return (
        users.select(F.col(USER).cast("int").alias(USER))
        .distinct()
        .join(seen_by_user, USER, "left")
        .select(USER, F.coalesce("seen", F.array().cast("array<int>")).alias("seen"))
    )


def _frame(user: int, items: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            USER: np.full(len(items), user, dtype=np.int32),
            "rank": np.arange(1, len(items) + 1, dtype=np.int32),
            ITEM: items.astype(np.int32),
            "score": scores.astype(np.float32),
        }
    )


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if frames:
        return pd.concat(frames, ignore_index=True)
    return _frame(0, np.empty(0, np.int32), np.empty(0, np.float32))


def most_popular(
    train: DataFrame,
    users: DataFrame,
    k: int,
    *,
    seen: DataFrame | None = None,
    broadcasts: list[Broadcast] | None = None,
) -> DataFrame:
    """The ``k`` items with the most training users that each user has not seen.

    Parameters
    ----------
    train
        Interactions (``user_idx``, ``item_idx``, optionally ``strength``) defining popularity: the
        item's count of positive rows (:func:`~mf_spark.evaluate.metrics.positive_users_per_item`), ties
        broken by the smaller ``item_idx``.
    users
        ``user_idx`` of the users to recommend for.
    seen
        ``user_idx``, ``item_idx`` excluded per user; defaults to ``train``.
    broadcasts
        Gets the catalogue's broadcast, for the caller to destroy once the lists are consumed (see
        :func:`mf_spark.recommend.recommend_top_k`).

    Returns
    -------
    DataFrame
        ``user_idx`` int, ``rank`` int (1-based), ``item_idx`` int, ``score`` float (the item's count).
    """
    counts = positive_users_per_item(train, ITEM).orderBy(F.desc("n_users"), F.asc(ITEM)).toPandas()
    ranked_items = counts[ITEM].to_numpy(np.int64)
    ranked_counts = counts["n_users"].to_numpy(np.float64)
    sc = train.sparkSession.sparkContext
    catalogue = sc.broadcast((ranked_items, ranked_counts))
    if broadcasts is not None:
        broadcasts.append(catalogue)

    def recommend(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        items, scores = catalogue.value
        for batch in batches:
            frames = []
            for user, seen_items in zip(batch[USER].to_numpy(), batch["seen"], strict=True):
                # the first k unseen items are among the first k + |seen| popular ones
                head = min(len(items), k + len(seen_items))
                keep = ~np.isin(items[:head], np.asarray(seen_items, dtype=np.int64))
                chosen = np.flatnonzero(keep)[:k]
                frames.append(_frame(int(user), items[chosen], scores[chosen]))
            yield _concat(frames)

    return _seen_lists(users, train if seen is None else seen).mapInPandas(recommend, RECOMMENDATION_SCHEMA)


def random_items(
    catalogue: DataFrame,
    users: DataFrame,
    k: int,
    *,
    seen: DataFrame,
    seed: int = 0,
    broadcasts: list[Broadcast] | None = None,
) -> DataFrame:
    """``k`` distinct unseen catalogue items per user drawn uniformly at random, reproducibly.

    Parameters
    ----------
    catalogue
        ``item_idx`` of the recommendable items (duplicates ignored).
    users
        ``user_idx`` of the users to recommend for.
    seen
        ``user_idx``, ``item_idx`` excluded per user.
    seed
        With ``user_idx``, seeds NumPy's PCG64 for that user's draw.
    broadcasts
        Gets the catalogue's broadcast, as in :func:`most_popular`.

    Returns
    -------
    DataFrame
        ``user_idx`` int, ``rank`` int (1-based), ``item_idx`` int, ``score`` float (``1/rank``).
    """
    items_sorted = np.sort(
        catalogue.select(F.col(ITEM).cast("long")).distinct().toPandas()[ITEM].to_numpy(np.int64)
    )
    sc = catalogue.sparkSession.sparkContext
    broadcast_items = sc.broadcast(items_sorted)
    if broadcasts is not None:
        broadcasts.append(broadcast_items)

    def recommend(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        items = broadcast_items.value
        for batch in batches:
            frames = []
            for user, seen_items in zip(batch[USER].to_numpy(), batch["seen"], strict=True):
                rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(user) & 0xFFFFFFFF])
                candidates = items[~np.isin(items, np.asarray(seen_items, dtype=np.int64))]
                chosen = (
                    rng.choice(candidates, size=min(k, len(candidates)), replace=False)
                    if len(candidates)
                    else candidates
                )
                frames.append(_frame(int(user), chosen, 1.0 / np.arange(1, len(chosen) + 1)))
            yield _concat(frames)

    return _seen_lists(users, seen).mapInPandas(recommend, RECOMMENDATION_SCHEMA)
