"""Fold-in: factors of entities unknown to a trained model, solved from their history.

A user who arrives after training but has interactions gets the factor that one more ALS half-step
would give them: the exact weighted least-squares solution against the *fixed* item factors, i.e.
the same normal equations as training (Hu, Koren and Volinsky 2008, eq. 4)::

    (YtY + sum_{i in R(u)} (c_ui - 1) y_i y_i^T + lambda_u I) x_u = sum_{i in R(u), r_ui > 0} c_ui y_i

with ``YtY`` the Gramian of all item factors. The solve is :func:`mf_spark.als.solve.solve_block`
with the Cholesky solver, per block of entities, on whole Arrow tables.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.als.blocks import FLOAT32_MAX, ordered_sum
from mf_spark.als.params import SolveParams
from mf_spark.als.solve import gramian, solve_block
from mf_spark.errors import InputDataError
from mf_spark.recommend.engine import factor_frame, factors_from_arrow

logger = logging.getLogger(__name__)

FACTOR_SCHEMA = T.StructType(
    [
        T.StructField("id", T.IntegerType(), False),
        T.StructField("features", T.ArrayType(T.FloatType()), False),
    ]
)


#: Ids per partial Gramian: at rank 256 a chunk is 64 MiB of float32 factors (128 MiB as float64).
GRAMIAN_CHUNK_IDS = 1 << 16


def factor_gramian(factors: DataFrame) -> tuple[np.ndarray, int]:
    """``(F^T F float64 (r, r), n rows)`` of a factor table.

    Summed from the Gramians of fixed id ranges (``id // GRAMIAN_CHUNK_IDS``, rows in id order), added
    on the driver in range order, as training adds its per-block Gramians: per-Arrow-batch partials
    summed in collect order gave a Gramian that changed in its last bits with the table's partitioning
    (the number of files, the executor count).
    """
    factors = factor_frame(factors, "fixed_factors")

    def chunk_gramian(table: pa.Table) -> pa.Table:
        chunk = int(table.column("chunk")[0].as_py())
        _, matrix = factors_from_arrow(table)  # rows sorted by id
        payload = pickle.dumps((gramian(matrix), matrix.shape[0]), protocol=5)
        return pa.table({"chunk": pa.array([chunk], pa.int64()), "payload": pa.array([payload], pa.binary())})

    rows = (
        factors.withColumn("chunk", F.floor(F.col("id") / GRAMIAN_CHUNK_IDS).cast("long"))
        .groupBy("chunk").applyInArrow(chunk_gramian, "chunk long, payload binary")
        .collect()
    )
    parts = [pickle.loads(row["payload"]) for row in sorted(rows, key=lambda row: row["chunk"])]
    if not parts:
        return np.zeros((0, 0)), 0
    total = parts[0][0].copy()
    for partial, _ in parts[1:]:
        total += partial
    return total, int(sum(n for _, n in parts))


def fold_in_factors(
    interactions: DataFrame,
    fixed_factors: DataFrame,
    params: SolveParams,
    *,
    src_col: str = "item_idx",
    dst_col: str = "user_idx",
    rating_col: str = "strength",
    dst_ids: DataFrame | None = None,
    block_size: int = 4096,
) -> DataFrame:
    """Solve the factors of the ``dst_col`` entities of ``interactions`` against fixed factors.

    Parameters
    ----------
    interactions : DataFrame
        Columns ``dst_col`` int (entity to solve), ``src_col`` int (id in ``fixed_factors``) and
        ``rating_col`` numeric; duplicate pairs are summed, as training does.
    fixed_factors : DataFrame
        ``id`` int, ``features`` array<float>: the trained factors of the other side.
    params : SolveParams
        Confidence and regularisation settings of the training run; the solve is always exact
        (``solver`` is set to ``"cholesky"``).
    dst_ids : DataFrame, optional
        Column ``id``: solve only these entities (e.g. users without factors).
    block_size : int
        Entities solved together in one task.

    Returns
    -------
    DataFrame
        ``id`` int, ``features`` array<float>: one row per entity with at least one interaction on a
        src id present in ``fixed_factors`` (interactions on unknown src ids are ignored).
    """
    for col in (src_col, dst_col, rating_col):
        if col not in interactions.columns:
            raise InputDataError(
                f"fold-in: interactions have no column '{col}' (columns: {', '.join(interactions.columns)})"
            )
    exact = dataclasses.replace(params, solver="cholesky")
    fixed = factor_frame(fixed_factors, "fixed_factors")
    fixed_gramian, n_src_total = factor_gramian(fixed)
    spark = interactions.sparkSession
    if n_src_total == 0:
        return spark.createDataFrame([], FACTOR_SCHEMA)

    ratings = _summed_ratings(interactions, src_col, dst_col, rating_col, dst_ids)
    with_factors = ratings.join(fixed.withColumnRenamed("id", "src"), "src")
    # Training refuses such values; here a NaN or infinite strength (or duplicates summing beyond float32)
    # gave the entity an all-NaN factor, and so silently no recommendations. Counted in the same job.
    not_finite = F.isnan("rating") | (F.abs("rating") > F.lit(FLOAT32_MAX))
    counts = with_factors.agg(
        F.count_distinct("dst").alias("n_dst"), F.sum(not_finite.cast("long")).alias("n_bad")
    ).first()
    if counts["n_bad"]:
        raise InputDataError(
            f"fold-in: column '{rating_col}' gives {counts['n_bad']} ({dst_col}, {src_col}) pairs a strength that "
            "is NaN, infinite or beyond float32's range (duplicates summed)"
        )
    n_dst = counts["n_dst"]
    if n_dst == 0:
        return spark.createDataFrame([], FACTOR_SCHEMA)
    num_blocks = max(1, math.ceil(n_dst / block_size))
    logger.info("fold-in: %d entities in %d blocks against %d fixed factors", n_dst, num_blocks, n_src_total)

    def solve_fold_in_block(table: pa.Table) -> pa.Table:  # typed: applyInArrow reads the hints
        return _solve_fold_in_block(table, fixed_gramian=fixed_gramian, n_src_total=n_src_total, params=exact)

    return (
        with_factors.withColumn("block", F.pmod(F.col("dst"), F.lit(num_blocks)))
        .repartition(num_blocks, "block")
        .groupBy("block")
        .applyInArrow(solve_fold_in_block, FACTOR_SCHEMA)
    )


def _summed_ratings(
    interactions: DataFrame, src_col: str, dst_col: str, rating_col: str, dst_ids: DataFrame | None
) -> DataFrame:
    """``dst, src, rating`` (float): one row per pair with a non-null rating, duplicates summed as training
    sums them, restricted to ``dst_ids`` when given."""
    ratings = interactions.select(
        F.col(dst_col).cast("int").alias("dst"), F.col(src_col).cast("int").alias("src"),
        F.col(rating_col).cast("double").alias("rating"),
    ).where(F.col("dst").isNotNull() & F.col("src").isNotNull() & F.col("rating").isNotNull())
    if dst_ids is not None:
        if "id" not in dst_ids.columns:
            raise InputDataError(
                f"fold-in: dst_ids has no column 'id' (columns: {', '.join(dst_ids.columns)})"
            )
        wanted = dst_ids.select(F.col("id").cast("int").alias("dst")).distinct()
        ratings = ratings.join(wanted, "dst", "left_semi")
    # In value order, as training sums duplicates: a plain Spark sum adds in arrival order, so the same
    # rows partitioned differently gave another strength and another folded factor.
    return ratings.groupBy("dst", "src").agg(ordered_sum("rating").cast("float").alias("rating"))


def _solve_fold_in_block(
    table: pa.Table, *, fixed_gramian: np.ndarray, n_src_total: int, params: SolveParams
) -> pa.Table:
    """Solve one block's entities: ``table`` holds ``dst, src, rating, features`` (one row per pair, the
    src's fixed factor beside it); returns ``id, features`` per distinct dst, shapes as in training's
    :func:`~mf_spark.als.solve.solve_block` (``fixed_gramian`` rank x rank)."""
    dst = table.column("dst").to_numpy()
    src = table.column("src").to_numpy()
    rating = table.column("rating").to_numpy().astype(np.float32)
    # One factor row per distinct src of the block, in src id order.
    by_src = np.argsort(src, kind="stable")
    src_unique, first = np.unique(src[by_src], return_index=True)
    src_rows = pa.table({"id": table.column("src"), "features": table.column("features")})
    _, local_factors = factors_from_arrow(src_rows.take(pa.array(by_src[first])))
    order = np.lexsort((src, dst))
    dst, src, rating = dst[order], src[order], rating[order]
    dst_unique, counts = np.unique(dst, return_counts=True)
    indptr = np.zeros(dst_unique.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.searchsorted(src_unique, src).astype(np.int32)
    solved = solve_block(indptr, indices, rating, local_factors, fixed_gramian, n_src_total, params)
    rank = solved.shape[1]
    features = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (dst_unique.shape[0] + 1) * rank, rank, dtype=np.int32)),
        pa.array(solved.ravel(), pa.float32()),
    )
    return pa.table({"id": pa.array(dst_unique.astype(np.int32)), "features": features})


def fold_in_new_users(
    user_factors: DataFrame,
    item_factors: DataFrame,
    interactions: DataFrame,
    params: SolveParams,
    *,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
    rating_col: str = "strength",
    block_size: int = 4096,
) -> tuple[DataFrame, DataFrame]:
    """User factors completed with folded-in factors of users who have interactions but no factors.

    Returns
    -------
    (all_users, new_users) : (DataFrame, DataFrame)
        Both ``id`` int, ``features`` array<float>; ``all_users`` is ``user_factors`` plus ``new_users``.
    """
    known = factor_frame(user_factors, "user_factors")
    missing = (
        interactions.select(F.col(user_col).cast("int").alias("id"))
        .distinct()
        .join(known.select("id"), "id", "left_anti")
    )
    new_users = fold_in_factors(
        interactions, item_factors, params, src_col=item_col, dst_col=user_col, rating_col=rating_col,
        dst_ids=missing, block_size=block_size,
    )
    return known.unionByName(new_users), new_users
