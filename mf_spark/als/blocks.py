"""Rating blocks and factor routing for the block-partitioned ALS.

This mirrors the partitioning of Spark MLlib's ``ALS.scala`` (``partitionRatings``, ``makeBlocks``,
``InBlock``/``OutBlock``), with numpy arrays in place of its encoded ints:

* Entity ``id`` belongs to block ``id mod num_blocks`` (MLlib's HashPartitioner on Int ids).
* An :class:`InBlock` holds, for the *dst* entities of one block (the side being solved), their ratings
  as a CSR matrix against the *local* list of src entities that block needs. That local list is
  ordered by (src block, src id), so the factors arriving from src block ``j`` form one contiguous
  slice ``src_offsets[j]:src_offsets[j+1]``.
* The out-block routing of src block ``j`` is ``{dst block b: positions of the ids b needs in j's
  sorted id array}``: each factor is shipped at most once to each dst block that has ratings for it.

Each rating is stored twice (once per side), built once and cached for all iterations.

Blocks are built with ``groupBy(block).applyInArrow``: Python sees whole blocks as Arrow tables, never
single rows.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.errors import InputDataError

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def block_partition(block_id: int) -> int:
    """Identity partition function: RDD partition ``b`` holds block ``b``.

    It must be this one module-level function everywhere, because PySpark compares partitioners by
    function identity; equal partitioners let ``union`` zip co-partitioned RDDs without a shuffle.
    """
    return block_id


def block_of(ids: np.ndarray, num_blocks: int) -> np.ndarray:
    """Block of each id: ``id mod num_blocks`` (non-negative), as MLlib's HashPartitioner on Ints."""
    return np.mod(ids, num_blocks).astype(np.int32)


@dataclass
class InBlock:
    """Ratings of one block of dst entities against its local src entities.

    Attributes
    ----------
    dst_ids : (n_dst,) int32, sorted, unique
    indptr : (n_dst + 1,) int64, CSR row pointers
    indices : (nnz,) int32, index into ``src_ids``
    ratings : (nnz,) float32, strengths (duplicates already summed)
    src_ids : (n_src_local,) int32, ordered by (src block, id)
    src_offsets : (num_src_blocks + 1,) int64, slice of ``src_ids`` coming from each src block
    n_positive : (n_dst,) int32, count of ratings > 0 per dst entity
    """

    dst_ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    ratings: np.ndarray
    src_ids: np.ndarray
    src_offsets: np.ndarray
    n_positive: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def needed_from(self, src_block: int) -> np.ndarray:
        """Sorted ids this block needs from ``src_block``."""
        return self.src_ids[self.src_offsets[src_block] : self.src_offsets[src_block + 1]]


def make_in_block(dst: np.ndarray, src: np.ndarray, ratings: np.ndarray, num_src_blocks: int) -> InBlock:
    """Build the :class:`InBlock` of one dst block from its (dst, src, rating) triples.

    Duplicate (dst, src) pairs are summed here: all of them land in the same block, so no Spark
    aggregation is needed. They are summed in float64 in value order, so the result does not depend on
    the order rows arrive in.
    """
    dst = dst.astype(np.int32, copy=False)
    src = src.astype(np.int32, copy=False)
    ratings = ratings.astype(np.float64, copy=False)
    order = np.lexsort((ratings, src, dst))
    dst, src, ratings = dst[order], src[order], ratings[order]
    first = np.ones(dst.shape[0], dtype=bool)
    first[1:] = (dst[1:] != dst[:-1]) | (src[1:] != src[:-1])
    if not first.all():
        starts = np.flatnonzero(first)
        ratings = np.add.reduceat(ratings, starts)
        dst, src = dst[starts], src[starts]
    ratings = ratings.astype(np.float32)
    dst_ids, counts = np.unique(dst, return_counts=True)
    indptr = np.zeros(dst_ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])

    unique_src = np.unique(src)
    src_block = block_of(unique_src, num_src_blocks)
    by_block = np.lexsort((unique_src, src_block))
    src_ids = unique_src[by_block]
    # local index of each rating's src: position of src in src_ids
    rank_in_unique = np.searchsorted(unique_src, src)
    local_of_unique = np.empty_like(by_block)
    local_of_unique[by_block] = np.arange(by_block.shape[0])
    indices = local_of_unique[rank_in_unique].astype(np.int32)
    src_offsets = np.zeros(num_src_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(src_block, minlength=num_src_blocks), out=src_offsets[1:])
    positive_rows = np.repeat(np.arange(dst_ids.shape[0]), counts)[ratings > 0]
    n_positive = np.bincount(positive_rows, minlength=dst_ids.shape[0]).astype(np.int32)
    return InBlock(dst_ids, indptr, indices, ratings, src_ids, src_offsets, n_positive)


def validate_ratings(ratings: DataFrame, user_col: str, item_col: str, rating_col: str) -> DataFrame:
    """Check and cast the input.

    Returns columns ``user`` int, ``item`` int, ``rating`` double. Ids must be integers in the Int range
    (as MLlib's ``checkIntegers``) and ratings must not be null or NaN; otherwise
    :class:`~mf_spark.errors.InputDataError` names the column. Duplicate (user, item) rows are summed
    later, inside :func:`make_in_block` (MLlib keeps them and so counts their terms twice; summing is
    the usual meaning of repeated events).
    """
    for col in (user_col, item_col, rating_col):
        if col not in ratings.columns:
            raise InputDataError(f"ImplicitALS: input has no column '{col}' (columns: {', '.join(ratings.columns)})")
    schema = {f.name: f.dataType for f in ratings.schema.fields}
    for col in (user_col, item_col):
        if not isinstance(schema[col], T.NumericType):
            raise InputDataError(f"ImplicitALS: column '{col}' must be numeric integer ids, got {schema[col].simpleString()}")
    if not isinstance(schema[rating_col], T.NumericType):
        raise InputDataError(f"ImplicitALS: column '{rating_col}' must be numeric, got {schema[rating_col].simpleString()}")

    def bad_id(col: str):
        c = F.col(col)
        if isinstance(schema[col], T.IntegerType | T.ShortType | T.ByteType):
            return c.isNull()
        d = c.cast("double")
        return c.isNull() | (d < INT_MIN) | (d > INT_MAX) | (d != F.floor(d)) | F.isnan(d)

    rating = F.col(rating_col).cast("double")
    checks = ratings.agg(
        F.sum(bad_id(user_col).cast("long")).alias("bad_user"),
        F.sum(bad_id(item_col).cast("long")).alias("bad_item"),
        F.sum((rating.isNull() | F.isnan(rating)).cast("long")).alias("bad_rating"),
    ).first()
    problems = []
    if checks["bad_user"]:
        problems.append(f"{checks['bad_user']} values of '{user_col}' are null, fractional or outside the Int range")
    if checks["bad_item"]:
        problems.append(f"{checks['bad_item']} values of '{item_col}' are null, fractional or outside the Int range")
    if checks["bad_rating"]:
        problems.append(f"{checks['bad_rating']} values of '{rating_col}' are null or NaN")
    if problems:
        raise InputDataError("ImplicitALS only supports integer ids in the Int range and non-NaN ratings: " + "; ".join(problems))
    return ratings.select(
        F.col(user_col).cast("int").alias("user"), F.col(item_col).cast("int").alias("item"), rating.alias("rating")
    )


_BLOCK_SCHEMA = T.StructType([
    T.StructField("block", T.IntegerType()),
    T.StructField("in_block", T.BinaryType()),
    T.StructField("out_block", T.BinaryType()),
])


def make_out_block(in_block: InBlock, num_src_blocks: int) -> dict[int, np.ndarray]:
    """Out-block of this block's entities when they are the *fixed* side.

    ``{other block b: positions into in_block.dst_ids}`` of the entities rated together with some
    entity of block ``b``, sorted by id: exactly what block ``b``'s :class:`InBlock` expects from us.
    """
    src_ids = in_block.src_ids[in_block.indices]
    other_block = block_of(src_ids, num_src_blocks)
    rows = np.repeat(np.arange(in_block.dst_ids.shape[0]), np.diff(in_block.indptr))
    out = {}
    for b in np.unique(other_block):
        out[int(b)] = np.unique(rows[other_block == b]).astype(np.int32)
    return out


def make_blocks(
    ratings: DataFrame,
    dst_col: str,
    src_col: str,
    num_dst_blocks: int,
    num_src_blocks: int,
    storage_level: StorageLevel,
) -> tuple[RDD, RDD]:
    """In-blocks and out-blocks of one side, built in one pass over the ratings.

    Returns ``RDD[(block, InBlock)]`` (this side solved) and ``RDD[(block, {other block: positions})]``
    (this side fixed), both persisted and partitioned by :func:`block_partition`. ``ratings`` has
    columns ``user``, ``item``, ``rating`` (from :func:`validate_ratings`).
    """

    def build(table: pa.Table) -> pa.Table:
        dst = table.column(dst_col).to_numpy()
        src = table.column(src_col).to_numpy()
        vals = table.column("rating").to_numpy()
        block = int(table.column("block")[0].as_py())
        in_block = make_in_block(dst, src, vals, num_src_blocks)
        out_block = make_out_block(in_block, num_src_blocks)
        return pa.table({
            "block": pa.array([block], pa.int32()),
            "in_block": pa.array([pickle.dumps(in_block, protocol=5)], pa.binary()),
            "out_block": pa.array([pickle.dumps(out_block, protocol=5)], pa.binary()),
        })

    packed = (
        ratings.withColumn("block", F.pmod(F.col(dst_col), F.lit(num_dst_blocks)).cast("int"))
        .groupBy("block")
        .applyInArrow(build, _BLOCK_SCHEMA)
        .rdd.map(lambda row: (row[0], (row[1], row[2])))
        .partitionBy(num_dst_blocks, block_partition)
        .persist(storage_level)
    )
    in_blocks = packed.mapValues(lambda v: pickle.loads(v[0])).persist(storage_level)
    out_blocks = packed.mapValues(lambda v: pickle.loads(v[1])).persist(storage_level)
    in_blocks.count()
    out_blocks.count()
    packed.unpersist()
    return in_blocks, out_blocks
