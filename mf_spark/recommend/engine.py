"""Top-k recommendations for every src entity: Spark plans around the numpy block kernels.

``src`` rows (users) are grouped into blocks of about ``src_block_size`` rows (block = ``id mod
num_blocks``, as MLlib's HashPartitioner on Int ids). Each block's seen pairs are co-grouped with its
factor rows in the same shuffle (``cogroup(...).applyInArrow``), so the seen mask is built per block
from whole Arrow tables, never by a row-level anti-join. The block is then scored by
:func:`mf_spark.recommend.topk.block_top_k`, which masks seen and excluded pairs *before* its top-k.

Two plans, chosen by the size of the dst matrix (after the allow/exclude filters):

* **broadcast** (``n_dst * rank * 4 <= max_broadcast_bytes``, default 128 MiB): the dst matrix is
  collected once, broadcast, and every block task scores against all of it, in column tiles of at
  most ``dst_chunk_size``. One shuffle (the co-group), no merge step.
* **cross**: dst rows are packed into chunks of about ``dst_chunk_size`` (chunk = ``id mod
  num_chunks``), every src block is crossed with every chunk (a few tasks per core, each scoring many
  pairs and folding a block's per-chunk top-k lists into one as they come), and a second step merges
  the few lists of each block with the same exact order. The packed blocks and chunks are persisted
  (memory and disk) for the lifetime of the returned DataFrame's lineage; they are at most the size
  of the two factor tables plus the seen pairs.

Memory per task is bounded by the block and chunk sizes (plus, in the broadcast plan, the broadcast
matrix), whatever the number of src rows or chunks. The order of a list is total (higher score, then
lower dst id) and the block layout depends only on the data, so reruns give identical tables.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import Broadcast, StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.blas import task_blas_threads
from mf_spark.errors import InputDataError
from mf_spark.recommend.topk import (
    DEFAULT_MAX_TILE_COLUMNS,
    DEFAULT_TILE_ELEMENTS,
    TopK,
    block_top_k,
    csr_from_pairs,
    merge_top_k_lists,
    normalize_rows,
)

logger = logging.getLogger(__name__)

#: Largest dst matrix (float32 bytes) scored by broadcasting it to every task.
DEFAULT_MAX_BROADCAST_BYTES = 128 * 1024 * 1024

RECOMMENDATION_SCHEMA = T.StructType(
    [
        T.StructField("src", T.IntegerType(), False),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("dst", T.IntegerType(), False),
        T.StructField("score", T.FloatType(), False),
    ]
)
_PAYLOAD_SCHEMA = "block int, payload binary"


def factors_from_arrow(
    table: pa.Table, id_col: str = "id", features_col: str = "features"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 (n,), factors float32 (n, r))`` of an Arrow factor table, rows sorted by id.

    Null entries inside a vector become NaN (such rows are then skipped by the kernel).
    """
    ids = table.column(id_col).to_numpy().astype(np.int32)
    features = table.column(features_col).combine_chunks()
    n = len(features)
    if n == 0:
        return ids, np.zeros((0, 0), np.float32)
    offsets = features.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lengths.min() != lengths.max():
        raise ValueError(f"'{features_col}' vectors have lengths {lengths.min()}..{lengths.max()}")
    values = features.values.slice(offsets[0], offsets[-1] - offsets[0])
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, int(lengths[0]))
    order = np.argsort(ids, kind="stable")
    return ids[order], matrix[order]


def _topk_table(result: TopK) -> pa.Table:
    return pa.table(
        {
            "src": pa.array(result.src, pa.int32()),
            "rank": pa.array(result.rank, pa.int32()),
            "dst": pa.array(result.dst, pa.int32()),
            "score": pa.array(result.score, pa.float32()),
        }
    )


def factor_frame(df: DataFrame, name: str) -> DataFrame:
    """``id`` int, ``features`` array<float> of a factor table.

    Raises :class:`InputDataError` naming the missing or mistyped column.
    """
    for col in ("id", "features"):
        if col not in df.columns:
            raise InputDataError(
                f"{name}: factor table has no column '{col}' (columns: {', '.join(df.columns)})"
            )
    types = {f.name: f.dataType for f in df.schema.fields}
    features = types["features"]
    if not isinstance(features, T.ArrayType) or not isinstance(features.elementType, T.NumericType):
        raise InputDataError(f"{name}: column 'features' must be array<float>, got {features.simpleString()}")
    return df.select(
        F.col("id").cast("int").alias("id"), F.col("features").cast("array<float>").alias("features")
    )


def _factor_stats(frames: dict[str, DataFrame]) -> dict[str, tuple[int, int]]:
    """``name -> (rows, rank)`` of :func:`factor_frame` tables, in one Spark job.

    Raises :class:`InputDataError` naming the table on null or duplicate ids or vectors of different
    lengths.
    """
    union = None
    for side, (name, df) in enumerate(frames.items()):
        tagged = df.select(F.lit(side).alias("side"), "id", "features")
        union = tagged if union is None else union.unionByName(tagged)
    assert union is not None
    rows = {
        r["side"]: r
        for r in union.groupBy("side").agg(
            F.count(F.lit(1)).alias("n"),
            F.min(F.size("features")).alias("min_rank"),
            F.max(F.size("features")).alias("max_rank"),
            F.sum(F.col("id").isNull().cast("long")).alias("null_ids"),
            # size(NULL) is NULL under ANSI mode, which min/max skip: count null vectors and elements
            F.sum((F.col("features").isNull() | F.exists("features", lambda x: x.isNull())).cast("long"))
            .alias("null_features"),
            F.count_distinct("id").alias("distinct_ids"),
        ).collect()
    }
    out = {}
    for side, name in enumerate(frames):
        stats = rows.get(side)
        if stats is None:
            out[name] = (0, 0)
            continue
        if stats["null_ids"]:
            raise InputDataError(f"{name}: {stats['null_ids']} rows have a null 'id'")
        if stats["null_features"]:
            raise InputDataError(f"{name}: {stats['null_features']} rows have a null 'features' vector or a "
                                 "null element in it")
        if stats["distinct_ids"] != stats["n"]:
            duplicates = stats["n"] - stats["distinct_ids"]
            raise InputDataError(f"{name}: column 'id' has {duplicates} duplicate values")
        if stats["min_rank"] != stats["max_rank"] or stats["min_rank"] < 1:
            raise InputDataError(
                f"{name}: column 'features' must hold vectors of one length, found lengths "
                f"{stats['min_rank']}..{stats['max_rank']} (-1 = null vector)"
            )
        out[name] = (int(stats["n"]), int(stats["max_rank"]))
    return out


def _id_frame(df: DataFrame, name: str) -> DataFrame:
    if "id" not in df.columns:
        raise InputDataError(f"{name}: table has no column 'id' (columns: {', '.join(df.columns)})")
    return df.select(F.col("id").cast("int").alias("id")).distinct()


def recommend_top_k(
    src_factors: DataFrame,
    dst_factors: DataFrame,
    k: int,
    *,
    seen: DataFrame | None = None,
    seen_src_col: str = "user_idx",
    seen_dst_col: str = "item_idx",
    exclude_dst: DataFrame | None = None,
    allow_dst: DataFrame | None = None,
    src_block_size: int = 4096,
    dst_chunk_size: int = 50000,
    normalize: bool = False,
    exclude_self: bool = False,
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES,
    broadcasts: list[Broadcast] | None = None,
) -> DataFrame:
    """Top ``k`` dst rows per src row by dot product (or cosine), with seen and filtered dst removed.

    Parameters
    ----------
    src_factors, dst_factors : DataFrame
        Factor tables: ``id`` int, ``features`` array<float> of one length (MLlib's layout).
    k : int
        List length; a src with fewer than ``k`` candidates left gets fewer rows.
    seen : DataFrame, optional
        Pairs never recommended, e.g. the training interactions: columns ``seen_src_col`` and
        ``seen_dst_col`` (other columns ignored, duplicates allowed).
    exclude_dst : DataFrame, optional
        Column ``id``: dst removed for everyone (out of stock, not allowed in a region).
    allow_dst : DataFrame, optional
        Column ``id``: only these dst are candidates.
    src_block_size : int
        Src rows scored together in one task.
    dst_chunk_size : int
        Dst rows per chunk in the cross plan; the column tiles inside a block are at most
        ``min(dst_chunk_size, 16384)`` wide.
    normalize : bool
        Score by cosine: both sides' rows are scaled to unit norm (all-zero rows score 0).
    exclude_self : bool
        Never pair a src with the dst of the same id (similar items).
    max_broadcast_bytes : int
        Use the broadcast plan when the dst matrix (float32) is at most this size.
    broadcasts : list, optional
        The caller's list of what it must destroy: the broadcast plan appends its dst broadcast. Destroy
        it (``Broadcast.destroy()``) once nothing will read the returned DataFrame or a cache derived from
        it again: Spark serialises the lineage into every task, cached or not, so any later job on them
        fails. Without a list the broadcast, and its driver temp file of the whole dst matrix, lives until
        the session stops: a tuning run of hundreds of fits filled the driver's disk that way.

    Returns
    -------
    DataFrame
        ``src`` int, ``rank`` int (1..k), ``dst`` int, ``score`` float: one row per recommendation,
        ordered within a src by score descending, ties by dst id ascending. Src rows whose factors
        are not finite get no rows; dst rows whose factors are not finite are never recommended.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if src_block_size < 1 or dst_chunk_size < 1:
        raise ValueError("src_block_size and dst_chunk_size must be >= 1")
    spark = src_factors.sparkSession
    src = factor_frame(src_factors, "src_factors")
    dst = factor_frame(dst_factors, "dst_factors")
    if allow_dst is not None:
        dst = dst.join(_id_frame(allow_dst, "allow_dst"), "id", "left_semi")
    if exclude_dst is not None:
        dst = dst.join(_id_frame(exclude_dst, "exclude_dst"), "id", "left_anti")
    stats = _factor_stats({"src_factors": src, "dst_factors": dst})
    (n_src, src_rank), (n_dst, dst_rank) = stats["src_factors"], stats["dst_factors"]
    if n_src == 0 or n_dst == 0:
        return spark.createDataFrame([], RECOMMENDATION_SCHEMA)
    if src_rank != dst_rank:
        raise InputDataError(f"src_factors have rank {src_rank} but dst_factors have rank {dst_rank}")

    num_blocks = max(1, math.ceil(n_src / src_block_size))
    src_blocks = (
        src.withColumn("block", F.pmod(F.col("id"), F.lit(num_blocks))).repartition(num_blocks, "block")
    )
    seen_blocks = None
    if seen is not None:
        for col in (seen_src_col, seen_dst_col):
            if col not in seen.columns:
                raise InputDataError(
                    f"seen: table has no column '{col}' (columns: {', '.join(seen.columns)})"
                )
        seen_blocks = (
            seen.select(
                F.col(seen_src_col).cast("int").alias("src"), F.col(seen_dst_col).cast("int").alias("dst")
            )
            .where(F.col("src").isNotNull() & F.col("dst").isNotNull())
            .withColumn("block", F.pmod(F.col("src"), F.lit(num_blocks)))
            .repartition(num_blocks, "block")
        )
    kernel_args: dict[str, Any] = {
        "exclude_self": exclude_self,
        "max_tile_columns": min(dst_chunk_size, DEFAULT_MAX_TILE_COLUMNS),
        "tile_elements": DEFAULT_TILE_ELEMENTS,
    }
    dst_bytes = n_dst * dst_rank * 4
    plan = "broadcast" if dst_bytes <= max_broadcast_bytes else "cross"
    logger.info(
        "top-%d: %d src in %d blocks x %d dst (rank %d, %.1f MiB): %s plan",
        k, n_src, num_blocks, n_dst, dst_rank, dst_bytes / 2**20, plan,
    )
    if plan == "broadcast":
        return _broadcast_plan(spark, src_blocks, seen_blocks, dst, k, normalize, kernel_args, broadcasts)
    num_chunks = max(1, math.ceil(n_dst / dst_chunk_size))
    return _cross_plan(spark, src_blocks, seen_blocks, dst, k, normalize, kernel_args, num_chunks)


def _block_inputs(src_table: pa.Table, seen_table: pa.Table | None, normalize: bool):
    ids, factors = factors_from_arrow(src_table)
    if normalize:
        factors = normalize_rows(factors)
    if seen_table is None or seen_table.num_rows == 0:
        return ids, factors, None, None
    indptr, seen_dst = csr_from_pairs(
        ids.astype(np.int64), seen_table.column("src").to_numpy(), seen_table.column("dst").to_numpy()
    )
    return ids, factors, indptr, seen_dst


def _apply_per_block(
    src_blocks: DataFrame, seen_blocks: DataFrame | None, func, schema, empty: pa.Table
) -> DataFrame:
    """``func(src_table, seen_table | None)`` once per block, src rows and seen pairs co-grouped.

    A block that has seen pairs but no src rows (users with history and no factors) yields ``empty``.
    """
    if seen_blocks is None:
        return src_blocks.groupBy("block").applyInArrow(lambda table: func(table, None), schema)
    return src_blocks.groupBy("block").cogroup(seen_blocks.groupBy("block")).applyInArrow(
        lambda left, right: func(left, right) if left.num_rows else empty, schema
    )


def _broadcast_plan(
    spark, src_blocks, seen_blocks, dst: DataFrame, k: int, normalize: bool, kernel_args, broadcasts
) -> DataFrame:
    dst_ids, dst_matrix = factors_from_arrow(dst.toArrow())
    if normalize:
        dst_matrix = normalize_rows(dst_matrix)
    dst_bc = spark.sparkContext.broadcast((dst_ids, dst_matrix))
    if broadcasts is not None:
        broadcasts.append(dst_bc)

    def score_block(src_table: pa.Table, seen_table: pa.Table | None) -> pa.Table:
        ids, factors, indptr, seen_dst = _block_inputs(src_table, seen_table, normalize)
        b_ids, b_matrix = dst_bc.value
        with task_blas_threads():
            result = block_top_k(
                ids, factors, b_ids, b_matrix, k, seen_indptr=indptr, seen_dst=seen_dst, **kernel_args
            )
        return _topk_table(result)

    empty = _topk_table(TopK.empty())
    return _apply_per_block(src_blocks, seen_blocks, score_block, RECOMMENDATION_SCHEMA, empty)


def _cross_plan(
    spark, src_blocks, seen_blocks, dst: DataFrame, k: int, normalize: bool, kernel_args, num_chunks: int
) -> DataFrame:
    def pack_src(src_table: pa.Table, seen_table: pa.Table | None) -> pa.Table:
        block = int(src_table.column("block")[0].as_py())
        payload = pickle.dumps(_block_inputs(src_table, seen_table, normalize), protocol=5)
        return pa.table({"block": pa.array([block], pa.int32()), "payload": pa.array([payload], pa.binary())})

    def pack_dst(dst_table: pa.Table) -> pa.Table:
        chunk = int(dst_table.column("chunk")[0].as_py())
        ids, factors = factors_from_arrow(dst_table)
        if normalize:
            factors = normalize_rows(factors)
        payload = pickle.dumps((ids, factors), protocol=5)
        return pa.table(
            {"chunk": pa.array([chunk], pa.int32()), "dst_payload": pa.array([payload], pa.binary())}
        )

    # The cartesian product evaluates each side once per partition of the other: persist the packed
    # sides so every block and chunk is packed once (recomputed from lineage if an executor is lost).
    no_payload = pa.table({"block": pa.array([], pa.int32()), "payload": pa.array([], pa.binary())})
    src_payload = _apply_per_block(src_blocks, seen_blocks, pack_src, _PAYLOAD_SCHEMA, no_payload).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    dst_payload = (
        dst.withColumn("chunk", F.pmod(F.col("id"), F.lit(num_chunks)))
        .repartition(num_chunks, "chunk")
        .groupBy("chunk")
        .applyInArrow(pack_dst, "chunk int, dst_payload binary")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )

    def merge(a: tuple, b: tuple) -> tuple:
        # Each (src, dst) pair is scored in one chunk only and the order is total, so merging lists two
        # at a time, in any grouping, gives the exact top-k.
        merged = merge_top_k_lists((a, b), k)
        return merged.src, merged.dst, merged.score

    def score_pairs(rows: Iterator[Any]) -> Iterator[tuple[int, bytes]]:
        # The product visits all chunks of one block in a row: unpickle each block once, and fold its
        # chunks' lists into one as they come, so that a task holds two lists, not one per chunk.
        current_block, block_inputs, best = None, None, None
        for row in rows:
            if row["block"] != current_block:
                if best is not None:
                    yield current_block, pickle.dumps(best, protocol=5)
                current_block, block_inputs, best = row["block"], pickle.loads(row["payload"]), None
            ids, factors, indptr, seen_dst = block_inputs
            chunk_ids, chunk_matrix = pickle.loads(row["dst_payload"])
            with task_blas_threads():
                result = block_top_k(
                    ids, factors, chunk_ids, chunk_matrix, k, seen_indptr=indptr, seen_dst=seen_dst, **kernel_args
                )
            found = (result.src, result.dst, result.score)
            best = found if best is None else merge(best, found)
        if best is not None:
            yield current_block, pickle.dumps(best, protocol=5)

    # A cartesian product runs one task per pair of partitions: with one partition per block and per
    # chunk, 12,000 blocks x 100 chunks made 1.2M tasks for the driver to track. A few tasks per core,
    # each scoring many (block, chunk) pairs, do the same work; and a block then reaches the merge
    # below as one list per partition of chunks (at most 4 per core), not one per chunk, which made
    # the merge's memory grow with the catalogue.
    parallelism = max(1, spark.sparkContext.defaultParallelism)
    src_partitions = min(src_payload.rdd.getNumPartitions(), 2 * parallelism)
    dst_partitions = min(num_chunks, max(1, 4 * parallelism // src_partitions))
    pairs = src_payload.coalesce(src_partitions).crossJoin(dst_payload.coalesce(dst_partitions))
    # RDD iteration streams one (block, chunk) pair at a time; an Arrow batch could hold thousands.
    partial = spark.createDataFrame(pairs.rdd.mapPartitions(score_pairs), _PAYLOAD_SCHEMA)

    def merge_block(table: pa.Table) -> pa.Table:
        parts = [pickle.loads(p) for p in table.column("payload").to_pylist()]
        return _topk_table(merge_top_k_lists(parts, k))

    return partial.groupBy("block").applyInArrow(merge_block, RECOMMENDATION_SCHEMA)


def has_nonzero_factor(column: str = "features") -> Column:
    """False for an all-zero factor vector; True otherwise, null vectors and elements included, so that the
    factor checks of :func:`recommend_top_k` report those instead of a filter dropping them."""
    return F.coalesce(F.exists(column, lambda x: x != 0), F.lit(True))


def similar_items(
    item_factors: DataFrame,
    k: int,
    *,
    src_block_size: int = 4096,
    dst_chunk_size: int = 50000,
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES,
    exclude_dst: DataFrame | None = None,
    allow_dst: DataFrame | None = None,
    broadcasts: list[Broadcast] | None = None,
) -> DataFrame:
    """Top ``k`` most similar items of every item by cosine of their factors, the item itself excluded.

    Items with an all-zero factor (ALS gives one to an item with no positive interaction) are left out
    on both sides: their cosine is 0 with everything, so their list would be the lowest indices.
    The parameters are those of :func:`recommend_top_k`.

    Returns
    -------
    DataFrame
        ``item`` int, ``rank`` int (1..k), ``similar_item`` int, ``score`` float (cosine).
    """
    item_factors = factor_frame(item_factors, "item_factors").where(has_nonzero_factor())
    recs = recommend_top_k(
        item_factors, item_factors, k, src_block_size=src_block_size, dst_chunk_size=dst_chunk_size,
        normalize=True, exclude_self=True, max_broadcast_bytes=max_broadcast_bytes,
        exclude_dst=exclude_dst, allow_dst=allow_dst, broadcasts=broadcasts,
    )
    return recs.select(F.col("src").alias("item"), "rank", F.col("dst").alias("similar_item"), "score")
