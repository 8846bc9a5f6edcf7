"""Deterministic train/test splits of an interactions table.

Every split is a pure function of the data and the seed: rows are ordered by a total order (time then
``item_idx``, or a seeded ``xxhash64`` then ``item_idx``) inside a window, never by ``rand()``, so a
retried Spark task or a different input partitioning produces the same split.

Interactions: ``user_idx`` int, ``item_idx`` int, ``strength`` float, ``n_events`` long,
``first_ts``/``last_ts`` timestamp, one row per user-item pair. Splits only need ``user_idx``,
``item_idx`` and (temporal splits) ``first_ts``, or ``last_ts`` in a table without it; other columns
are carried along.

Temporal splits place a pair by its *first* interaction: a pair is in the future when the user first
met the item there. Placed by ``last_ts``, an item bought before the cutoff and again after it went to
test whole, dropped out of the user's history and of the seen items, and counted as a hit that
production (which excludes seen items) never shows: a third of the sample's test pairs were repurchases.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from mf_spark.config import parse_iso_date, utc_midnight_micros
from mf_spark.errors import InputDataError
from mf_spark.tables import require_columns

log = logging.getLogger(__name__)

SPLITS = ("user_temporal", "global_temporal", "user_random", "strong_generalization")
USER, ITEM = "user_idx", "item_idx"
#: Time columns a temporal split places a pair by, in order of preference.
TIME_COLUMNS = ("first_ts", "last_ts")


@dataclass
class Split:
    """One train/test split.

    Attributes
    ----------
    train
        Interactions the models are trained on.
    test
        Held-out interactions of users who have history in ``train`` or, for strong generalisation,
        in ``fold_in``. Those with ``strength > 0`` (:attr:`relevant`) are scored.
    fold_in
        Strong generalisation only: the held-out users' visible history, used to fold their factors in
        against the trained item factors and as their seen items. ``None`` for the other protocols.
    cold_test
        Held-out interactions of users with no history at all (global temporal split: users who
        appear only after the cutoff). Counted in the report, not scored.
    protocol, settings
        How the split was made, for the report.
    """

    train: DataFrame
    test: DataFrame
    fold_in: DataFrame | None = None
    cold_test: DataFrame | None = None
    protocol: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def relevant(self) -> DataFrame:
        """The test rows that count as hits: ``strength > 0`` (a negative strength is a confident
        dislike, not something to recommend). Its users are the evaluated users."""
        if "strength" not in self.test.columns:
            return self.test
        return self.test.where(F.col("strength") > 0)

    @property
    def history(self) -> DataFrame:
        """Known interactions of the evaluated users' side: what is excluded from their lists."""
        if self.fold_in is None:
            return self.train
        return self.train.unionByName(self.fold_in)

    def counts(self) -> dict[str, int]:
        """Sizes for the report: rows and users of each part, cold users, test items unseen in training."""
        train_items = self.train.select(ITEM).distinct()
        unseen = self.relevant.join(train_items, ITEM, "left_anti")
        test_stats = self.relevant.agg(
            F.count(F.lit(1)).alias("rows"), F.count_distinct(USER).alias("users")
        ).first()
        train_stats = self.train.agg(
            F.count(F.lit(1)).alias("rows"),
            F.count_distinct(USER).alias("users"),
            F.count_distinct(ITEM).alias("items"),
        ).first()
        unseen_stats = unseen.agg(
            F.count(F.lit(1)).alias("rows"), F.count_distinct(ITEM).alias("items")
        ).first()
        counts = {
            "train_interactions": int(train_stats["rows"]),
            "train_users": int(train_stats["users"]),
            "train_items": int(train_stats["items"]),
            "test_interactions": int(test_stats["rows"]),
            "test_users": int(test_stats["users"]),
            "test_interactions_unseen_items": int(unseen_stats["rows"]),
            "test_items_unseen_in_train": int(unseen_stats["items"]),
        }
        counts["test_interactions_not_positive"] = (
            self.test.where(F.col("strength") <= 0).count() if "strength" in self.test.columns else 0
        )
        if self.cold_test is not None:
            cold = self.cold_test.agg(
                F.count(F.lit(1)).alias("rows"), F.count_distinct(USER).alias("users")
            ).first()
            counts["cold_test_interactions"] = int(cold["rows"])
            counts["cold_test_users"] = int(cold["users"])
        else:
            counts["cold_test_interactions"] = 0
            counts["cold_test_users"] = 0
        if self.fold_in is not None:
            counts["fold_in_interactions"] = self.fold_in.count()
        return counts


def _seeded_hash(seed: int, *columns: str) -> Column:
    return F.xxhash64(F.lit(int(seed)), *[F.col(c) for c in columns])


def _time_column(interactions: DataFrame) -> str:
    for name in TIME_COLUMNS:
        if name in interactions.columns:
            return name
    raise InputDataError(
        f"interactions lack a time column ({' or '.join(TIME_COLUMNS)}) needed by the temporal split "
        f"(have {', '.join(interactions.columns)})"
    )


def _n_test(n_rows: Column, test_fraction: float, test_n: int) -> Column:
    """Held-out rows of a user with ``n_rows`` interactions: at least one, and at least one kept.

    Users with a single interaction keep it in training.
    """
    wanted = F.lit(int(test_n)) if test_n > 0 else F.round(n_rows * float(test_fraction)).cast("int")
    return F.greatest(F.lit(0), F.least(F.greatest(wanted, F.lit(1)), n_rows - 1))


def _split_each_user(
    interactions: DataFrame, order: list[Column], test_fraction: float, test_n: int
) -> tuple[DataFrame, DataFrame]:
    """Per user, the last ``n_test`` rows in ``order`` are test, the rest train."""
    _check_test_size(test_fraction, test_n)
    by_user = Window.partitionBy(USER)
    positioned = (
        interactions.withColumn("_pos", F.row_number().over(by_user.orderBy(*order)))
        .withColumn("_n", F.count(F.lit(1)).over(by_user))
        .withColumn("_is_test", F.col("_pos") > F.col("_n") - _n_test(F.col("_n"), test_fraction, test_n))
    )
    train = positioned.where(~F.col("_is_test")).drop("_pos", "_n", "_is_test")
    test = positioned.where(F.col("_is_test")).drop("_pos", "_n", "_is_test")
    return train, test


def _check_test_size(test_fraction: float, test_n: int) -> None:
    if test_n < 0 or (test_n == 0 and not 0.0 < test_fraction < 1.0):
        raise ValueError(
            f"need test_n > 0 or 0 < test_fraction < 1, got test_n={test_n}, test_fraction={test_fraction}"
        )


def user_temporal_split(interactions: DataFrame, *, test_fraction: float = 0.2, test_n: int = 0) -> Split:
    """Each user's most recent items (by ``first_ts``, else ``last_ts``; ties by ``item_idx``) are the
    test set.

    ``test_n > 0`` holds out the last ``test_n``; otherwise ``round(test_fraction * n_u)``, at least 1;
    a user always keeps at least one training interaction (single-interaction users are train only).
    """
    require_columns(interactions, "interactions", (USER, ITEM))
    time = _time_column(interactions)
    train, test = _split_each_user(interactions, [F.col(time), F.col(ITEM)], test_fraction, test_n)
    return Split(
        train, test, protocol="user_temporal", settings={"test_fraction": test_fraction, "test_n": test_n}
    )


def user_random_split(
    interactions: DataFrame, *, test_fraction: float = 0.2, test_n: int = 0, seed: int = 7
) -> Split:
    """Per user, a seeded pseudo-random subset (ordered by ``xxhash64(seed, user, item)``) is the test set.

    Sizes as in :func:`user_temporal_split`.
    """
    require_columns(interactions, "interactions", (USER, ITEM))
    order = [_seeded_hash(seed, USER, ITEM), F.col(ITEM)]
    train, test = _split_each_user(interactions, order, test_fraction, test_n)
    return Split(
        train,
        test,
        protocol="user_random",
        settings={"test_fraction": test_fraction, "test_n": test_n, "seed": seed},
    )


def global_temporal_split(interactions: DataFrame, *, cutoff_date: str | dt.date) -> Split:
    """Pairs first met after ``cutoff_date`` (UTC day; ``first_ts``, else ``last_ts``) are the test set.

    Test rows of users with no interaction up to the cutoff go to ``cold_test`` (reported, not scored).
    A row without a time cannot be after the cutoff: it is training data (it fell out of both parts).
    """
    require_columns(interactions, "interactions", (USER, ITEM))
    time = _time_column(interactions)
    if isinstance(cutoff_date, str):
        try:
            cutoff_date = parse_iso_date(cutoff_date)
        except ValueError:
            raise ValueError(f"cutoff_date must be YYYY-MM-DD, got {cutoff_date!r}") from None
    # a date cast to timestamp is midnight in the session time zone: the cutoff moved by hours
    first_test_day = utc_midnight_micros(cutoff_date + dt.timedelta(days=1))
    is_test = F.coalesce(F.unix_micros(F.col(time).cast("timestamp")) >= F.lit(first_test_day), F.lit(False))
    train = interactions.where(~is_test)
    all_test = interactions.where(is_test)
    train_users = train.select(USER).distinct()
    test = all_test.join(train_users, USER, "left_semi")
    cold_test = all_test.join(train_users, USER, "left_anti")
    return Split(
        train,
        test,
        cold_test=cold_test,
        protocol="global_temporal",
        settings={"cutoff_date": cutoff_date.isoformat()},
    )


def strong_generalization_split(
    interactions: DataFrame, *, holdout_users: int = 100, test_fraction: float = 0.2, seed: int = 7
) -> Split:
    """Held-out users are absent from training; their factors are folded in from part of their history.

    The ``holdout_users`` users with the smallest ``xxhash64(seed, user_idx)`` (ties by ``user_idx``)
    among users with at least two interactions are held out. Each held-out user's interactions are
    split at random (seeded hash) into ``fold_in`` (``1 - test_fraction``) and ``test``; everyone
    else's interactions are ``train`` (the VAE-CF protocol of Liang et al. 2018).
    """
    require_columns(interactions, "interactions", (USER, ITEM))
    if holdout_users < 1:
        raise ValueError(f"holdout_users must be >= 1, got {holdout_users}")
    eligible = interactions.groupBy(USER).agg(F.count(F.lit(1)).alias("_n")).where(F.col("_n") >= 2)
    held_out = (
        eligible.withColumn("_h", _seeded_hash(seed, USER))
        .orderBy("_h", USER)
        .limit(int(holdout_users))
        .select(USER)
    )
    held_rows = interactions.join(held_out, USER, "left_semi")
    train = interactions.join(held_out, USER, "left_anti")
    order = [_seeded_hash(seed, USER, ITEM), F.col(ITEM)]
    fold_in, test = _split_each_user(held_rows, order, test_fraction, 0)
    return Split(
        train,
        test,
        fold_in=fold_in,
        protocol="strong_generalization",
        settings={"holdout_users": holdout_users, "test_fraction": test_fraction, "seed": seed},
    )


def make_split(
    interactions: DataFrame,
    protocol: str,
    *,
    test_fraction: float = 0.2,
    test_n: int = 0,
    cutoff_date: str | dt.date | None = None,
    holdout_users: int = 100,
    seed: int = 7,
) -> Split:
    """Dispatch to the split named ``protocol`` (one of :data:`SPLITS`)."""
    if protocol == "user_temporal":
        return user_temporal_split(interactions, test_fraction=test_fraction, test_n=test_n)
    if protocol == "user_random":
        return user_random_split(interactions, test_fraction=test_fraction, test_n=test_n, seed=seed)
    if protocol == "global_temporal":
        if not cutoff_date:
            raise ValueError("the global_temporal split needs a cutoff_date")
        return global_temporal_split(interactions, cutoff_date=cutoff_date)
    if protocol == "strong_generalization":
        return strong_generalization_split(
            interactions, holdout_users=holdout_users, test_fraction=test_fraction, seed=seed
        )
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {protocol!r}")
