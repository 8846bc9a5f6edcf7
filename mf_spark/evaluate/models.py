"""The models compared by the evaluation, each as "fit on the training part, recommend top K".

Every model excludes the user's known items (training rows, or the fold-in rows under strong
generalisation) from its lists and recommends only catalogue (training) items:

- ``implicit_als`` / ``implicit_als_cholesky``: :class:`mf_spark.ImplicitALS` with the CG or the exact solver;
- ``mllib_als``: :class:`pyspark.ml.recommendation.ALS` with ``implicitPrefs=True`` and the same
  hyperparameters; its factors are scored by the same :func:`mf_spark.recommend.recommend_top_k` with the same
  seen-item exclusion. MLlib has only the linear confidence and count-scaled regularisation; the ``log``
  confidence is given to it by feeding ``log(1 + r/eps)`` as the rating (identical confidences), and a
  non-``count`` regularisation is reported and replaced by ``count``;
- ``popular``: most positive training rows first, unseen only; ``random``: seeded uniform draw of unseen items.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mf_spark.als.params import SolveParams
from mf_spark.evaluate.baselines import most_popular, random_items

log = logging.getLogger(__name__)

ALS_MODELS = ("implicit_als", "implicit_als_cholesky", "mllib_als")
BASELINES = ("popular", "random")
MODELS = ALS_MODELS + BASELINES
USER, ITEM, STRENGTH = "user_idx", "item_idx", "strength"


@dataclass(frozen=True)
class TrainParams:
    """Hyperparameters shared by the factor models (names as in the ``[train]`` config section)."""

    rank: int = 32
    max_iter: int = 10
    reg_param: float = 0.1
    alpha: float = 10.0
    solver: str = "cg"
    cg_steps: int = 3
    regularization: str = "count"
    confidence: str = "linear"
    confidence_epsilon: float = 1.0
    frequency_alpha0: float = 0.1
    frequency_nu: float = 1.0
    num_user_blocks: int = 4
    num_item_blocks: int = 4
    checkpoint_interval: int = 5
    seed: int = 42

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TrainParams:
        """Take the known keys of ``values`` (e.g. the ``[train]`` section; others such as
        ``warm_start`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    def replace(self, **changes: Any) -> TrainParams:
        return dataclasses.replace(self, **changes)

    def als_params(self) -> dict[str, Any]:
        """Keyword arguments of MLlib's ``ALS`` (and ImplicitALS, which takes MLlib's names), on the
        evaluation's columns: both models get the same values from this one place."""
        return dict(
            rank=self.rank,
            maxIter=self.max_iter,
            regParam=self.reg_param,
            alpha=self.alpha,
            userCol=USER,
            itemCol=ITEM,
            ratingCol=STRENGTH,
            seed=self.seed,
            numUserBlocks=self.num_user_blocks,
            numItemBlocks=self.num_item_blocks,
            # ImplicitALS reads any value <= 0 as "never"; MLlib accepts only -1 for that
            checkpointInterval=self.checkpoint_interval if self.checkpoint_interval > 0 else -1,
        )

    def implicit_als_params(self) -> dict[str, Any]:
        """:meth:`als_params` plus ImplicitALS's own parameters."""
        return dict(
            self.als_params(),
            solver=self.solver,
            cgSteps=self.cg_steps,
            regularization=self.regularization,
            confidence=self.confidence,
            confidenceEpsilon=self.confidence_epsilon,
            frequencyAlpha0=self.frequency_alpha0,
            frequencyNu=self.frequency_nu,
        )

    def solve_params(self) -> SolveParams:
        return SolveParams(
            alpha=self.alpha,
            reg_param=self.reg_param,
            regularization=self.regularization,
            confidence=self.confidence,
            confidence_epsilon=self.confidence_epsilon,
            frequency_alpha0=self.frequency_alpha0,
            frequency_nu=self.frequency_nu,
            solver=self.solver,
            cg_steps=self.cg_steps,
        )


def params_for_model(model: str, params: TrainParams) -> TrainParams:
    """The parameters ``model`` actually trains with (solver fixed per model; MLlib's restrictions)."""
    if model == "implicit_als":
        return params.replace(solver="cg")
    if model == "implicit_als_cholesky":
        return params.replace(solver="cholesky")
    if model == "mllib_als":
        if params.regularization != "count":
            log.warning(
                "MLlib ALS has only count-scaled regularisation; using it instead of %r",
                params.regularization,
            )
        return params.replace(solver="cholesky", regularization="count")
    return params


@dataclass
class ModelRun:
    """One model's lists and what the report says about its training.

    ``recommendations``: ``user_idx`` int, ``rank`` int (1-based), ``item_idx`` int, ``score`` float.
    ``training_loss``: ImplicitALS's objective after each iteration. ``final_loss``: the objective of the
    trained factors; for MLlib (which reports no loss) it is computed from its factors with the same
    exact objective (:func:`mf_spark.als.train.objective`), so the two are comparable.
    """

    name: str
    recommendations: DataFrame
    params: dict[str, Any]
    training_loss: list[float] | None
    fit_seconds: float
    final_loss: float | None = None
    cached: list[DataFrame] = dataclasses.field(default_factory=list)
    persistent_rdds_before: frozenset[int] | None = None
    broadcasts: list[Broadcast] = dataclasses.field(default_factory=list)

    def release(self, keep: frozenset[int] = frozenset()) -> list[Broadcast]:
        """Free what the fit and the scoring left cached, once the recommendations are consumed.

        Both ALS estimators persist their factors (``finalStorageLevel``), MLlib as RDDs no public API
        can unpersist. Left cached, a tuning run of a few hundred fits filled the driver's storage
        memory until an aggregation failed with ``AGGREGATE_OUT_OF_MEMORY``. This unpersists the
        DataFrames in ``cached``, then every RDD persisted since the run started except the ids in
        ``keep`` (the caller's own caches made from the lists, see :func:`persistent_rdd_ids`).

        The broadcasts the factors and lists were computed with (each a driver temp file until
        destroyed) are destroyed too, unless ``keep`` is given: every job reading a kept cache derived
        from the lists serialises their lineage, broadcasts included, and fails once those are
        destroyed. They are then returned, for the caller to destroy with those caches.
        """
        for frame in self.cached:
            frame.unpersist()
        if self.persistent_rdds_before is not None:
            unpersist_since(self.recommendations.sparkSession, self.persistent_rdds_before | keep)
        broadcasts, self.broadcasts = self.broadcasts, []
        if keep:
            return broadcasts
        for broadcast in broadcasts:
            broadcast.destroy()
        return []


def persistent_rdd_ids(spark: SparkSession) -> frozenset[int]:
    """Ids of the RDDs persisted now (a DataFrame's cache is one once it has been computed)."""
    return frozenset(spark.sparkContext._jsc.getPersistentRDDs().keySet())


def unpersist_since(spark: SparkSession, before: frozenset[int]) -> int:
    """Unpersist every RDD persisted now whose id is not in ``before`` (:func:`persistent_rdd_ids`);
    returns how many. Reaches caches no handle is left to (MLlib's factors, a top-k plan's payloads)."""
    persistent = spark.sparkContext._jsc.getPersistentRDDs()
    released = 0
    for rdd_id in set(persistent.keySet()) - before:
        persistent.get(rdd_id).unpersist(False)
        released += 1
    return released


def mllib_objective(
    train: DataFrame, user_factors: DataFrame, item_factors: DataFrame, params: TrainParams
) -> float | None:
    """The objective ImplicitALS minimises, evaluated on MLlib's factors (MLlib reports no loss).

    None, with a log line, when MLlib's item factors exceed :data:`~mf_spark.als.train.OBJECTIVE_MAX_ITEM_BYTES`:
    the loss is informative only, and collecting them would need about three times their size on the driver.
    """
    from mf_spark.als.blocks import select_ratings
    from mf_spark.als.train import OBJECTIVE_MAX_ITEM_BYTES, objective

    item_bytes = item_factors.count() * params.rank * 4
    if item_bytes > OBJECTIVE_MAX_ITEM_BYTES:
        log.warning("MLlib's final loss is not computed: its item factors (%d MiB) exceed %d MiB on the driver",
                    item_bytes >> 20, OBJECTIVE_MAX_ITEM_BYTES >> 20)
        return None

    ratings = select_ratings(_mllib_ratings(train, params), USER, ITEM, STRENGTH)
    # the log confidence is already in the ratings MLlib saw; its own confidence is linear
    solve = dataclasses.replace(params.solve_params(), confidence="linear")
    return float(
        objective(train.sparkSession, ratings, user_factors, item_factors, solve, params.num_user_blocks)
    )


def _mllib_ratings(train: DataFrame, params: TrainParams) -> DataFrame:
    """The ratings to give MLlib so that its c = 1 + alpha*|r|, p = [r > 0] equals ImplicitALS's confidence.

    For the log confidence that is sign(r) * log1p(|r| / eps): log1p(r / eps) of a negative strength (a
    return) is null below -eps, which MLlib refuses, and the wrong magnitude above it.
    """
    if params.confidence == "log":
        strength = F.col(STRENGTH)
        return train.withColumn(
            STRENGTH, F.signum(strength) * F.log1p(F.abs(strength) / params.confidence_epsilon)
        )
    return train


def _fit_factors(
    model: str, train: DataFrame, params: TrainParams
) -> tuple[DataFrame, DataFrame, list[float] | None, list[Broadcast]]:
    """Train ``model``; returns user and item factors (``id`` int, ``features`` array<float>), the loss
    and the broadcasts the factors are computed from (ImplicitALS's ``trainingBroadcasts``)."""
    if model == "mllib_als":
        from pyspark.ml.recommendation import ALS

        fitted = ALS(implicitPrefs=True, **params.als_params()).fit(_mllib_ratings(train, params))
        return fitted.userFactors, fitted.itemFactors, None, []
    from mf_spark import ImplicitALS

    estimator = ImplicitALS(**params.implicit_als_params())
    fitted = estimator.fit(train)
    loss = [float(x) for x in fitted.trainingLoss]
    return fitted.userFactors, fitted.itemFactors, loss, fitted.trainingBroadcasts


def lists_from_factors(
    user_factors: DataFrame,
    item_factors: DataFrame,
    users: DataFrame,
    k: int,
    seen: DataFrame,
    broadcasts: list[Broadcast] | None = None,
) -> DataFrame:
    """The top ``k`` items of each of ``users`` (``user_idx``) by factor score, ``seen`` pairs
    (``user_idx``, ``item_idx``) left out; in the layout of :attr:`ModelRun.recommendations`.
    ``broadcasts`` as in :func:`mf_spark.recommend.recommend_top_k`."""
    from mf_spark.recommend import recommend_top_k

    wanted = user_factors.join(users.withColumnRenamed(USER, "id"), "id", "left_semi")
    return recommend_top_k(
        wanted, item_factors, k, seen=seen, seen_src_col=USER, seen_dst_col=ITEM, broadcasts=broadcasts
    ).select(
        F.col("src").cast("int").alias(USER),
        F.col("rank").cast("int").alias("rank"),
        F.col("dst").cast("int").alias(ITEM),
        F.col("score").cast("float").alias("score"),
    )


def recommend_for_users(
    model: str,
    train: DataFrame,
    users: DataFrame,
    k: int,
    params: TrainParams,
    *,
    fold_in: DataFrame | None = None,
    random_seed: int = 0,
    mllib_loss: bool = True,
) -> ModelRun:
    """Fit ``model`` on ``train`` and return the top ``k`` unseen catalogue items of each of ``users``.

    Parameters
    ----------
    model
        One of :data:`MODELS`.
    train
        ``user_idx``, ``item_idx``, ``strength``: the training interactions (also the catalogue and,
        for users in it, their seen items).
    users
        ``user_idx`` of the users to recommend for.
    fold_in
        Strong generalisation: the held-out users' visible interactions. Their factors are solved
        against the trained item factors (:func:`mf_spark.recommend.fold_in_factors`) and these rows
        are their seen items.
    random_seed
        Seed of the ``random`` baseline.
    mllib_loss
        Compute MLlib's final objective (:func:`mllib_objective`; one extra pass over the data).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    users = users.select(F.col(USER).cast("int").alias(USER)).distinct()
    seen = (
        train.select(USER, ITEM)
        if fold_in is None
        else train.select(USER, ITEM).unionByName(fold_in.select(USER, ITEM))
    )
    started = time.perf_counter()
    broadcasts: list[Broadcast] = []
    if model == "popular":
        recs = most_popular(train, users, k, seen=seen, broadcasts=broadcasts)
        return ModelRun(model, recs, {}, None, time.perf_counter() - started, broadcasts=broadcasts)
    if model == "random":
        recs = random_items(train.select(ITEM), users, k, seen=seen, seed=random_seed, broadcasts=broadcasts)
        return ModelRun(
            model, recs, {"seed": random_seed}, None, time.perf_counter() - started, broadcasts=broadcasts
        )

    from mf_spark.recommend import fold_in_factors

    persistent_before = persistent_rdd_ids(train.sparkSession)
    used = params_for_model(model, params)
    user_factors, item_factors, loss, fit_broadcasts = _fit_factors(model, train, used)
    broadcasts.extend(fit_broadcasts)
    fitted = [user_factors, item_factors]
    fit_seconds = time.perf_counter() - started
    final_loss = loss[-1] if loss else None
    if model == "mllib_als" and mllib_loss:
        final_loss = mllib_objective(train, user_factors, item_factors, used)
    if fold_in is not None:
        ratings = _mllib_ratings(fold_in, used) if model == "mllib_als" else fold_in
        solve = used.solve_params()
        if model == "mllib_als":  # its ratings already carry the log; MLlib's own solve is linear
            solve = dataclasses.replace(solve, confidence="linear")
        user_factors = fold_in_factors(
            ratings, item_factors, solve, src_col=ITEM, dst_col=USER, rating_col=STRENGTH
        )
    recs = lists_from_factors(user_factors, item_factors, users, k, seen, broadcasts)
    return ModelRun(
        model, recs, dataclasses.asdict(used), loss, fit_seconds, final_loss,
        cached=fitted, persistent_rdds_before=persistent_before, broadcasts=broadcasts,
    )
