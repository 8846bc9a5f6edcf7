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

Blocks are built by :func:`build_rating_blocks`: one ``mapInArrow`` pass checks the values and cuts every
input partition into per-block numpy chunks, and one shuffle per side gathers each block's chunks. Python
sees Arrow batches and numpy arrays, never single rows.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import RDD, SparkContext, StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.errors import InputDataError

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def block_partition(block_id: int) -> int:
    """Partition function of every block-keyed RDD: with ``P`` partitions, partition ``b mod P`` holds
    block ``b`` (PySpark's ``partitionBy`` takes the result modulo ``P``).

    It must be this one module-level function everywhere, because PySpark compares partitioners by
    function identity; equal partitioners let ``union`` zip co-partitioned RDDs without a shuffle.
    """
    return block_id


def num_task_partitions(sc: SparkContext, num_blocks: int) -> int:
    """Spark partitions (tasks per stage) that hold ``num_blocks`` blocks.

    On a cluster, one block per partition, as MLlib. In local mode, at most one partition per core
    (``defaultParallelism``): there a task beyond the core count only adds a wave of per-task overhead
    (about 30 ms per task on a 2-core machine, ``benchmarks/bench_overhead.py``), and a partition
    holding several blocks solves them one after another with the same results. On a cluster the core
    count at fit time is not known (dynamic allocation), so blocks are not packed there.
    """
    if sc.master.startswith("local"):
        return max(1, min(num_blocks, sc.defaultParallelism))
    return num_blocks


def group_by_block(records: Iterable[tuple[int, Any]]) -> list[tuple[int, list]]:
    """Values of one partition's ``(block, value)`` records, grouped by block, in block order."""
    grouped: dict[int, list] = {}
    for block, value in records:
        grouped.setdefault(block, []).append(value)
    return sorted(grouped.items(), key=lambda kv: kv[0])


def block_of(ids: np.ndarray, num_blocks: int) -> np.ndarray:
    """Block of each id: ``id mod num_blocks`` (non-negative), as MLlib's HashPartitioner on Ints.

    ``ids`` of any shape; the result has its shape, int32.
    """
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
        """Sorted ids this block needs from ``src_block``: a (n_needed,) int32 view of ``src_ids``."""
        return self.src_ids[self.src_offsets[src_block] : self.src_offsets[src_block + 1]]


def make_in_block(dst: np.ndarray, src: np.ndarray, ratings: np.ndarray, num_src_blocks: int) -> InBlock:
    """Build the :class:`InBlock` of one dst block from its (dst, src, rating) triples.

    ``dst``, ``src`` and ``ratings`` are (nnz,) arrays (ids of any integer type, ratings of any float
    type); ``num_src_blocks`` sizes ``src_offsets``.

    Duplicate (dst, src) pairs are summed here: all of them land in the same block, so no Spark
    aggregation is needed. They are summed in float64 in value order, so the result does not depend on
    the order rows arrive in.
    """
    dst = dst.astype(np.int32, copy=False)
    src = src.astype(np.int32, copy=False)
    ratings = ratings.astype(np.float64, copy=False)
    # One uint64 key ordered as (dst, src): one sort instead of a three-key lexsort (9x faster at 3M
    # ratings). Distinct keys leave no ties, so an unstable sort still gives one order.
    key = (_unsigned(dst) << np.uint64(32)) | _unsigned(src)
    order = np.argsort(key)
    first = _run_starts(key[order])
    if not first.all():
        # duplicates: order each repeated pair's values too, so their float64 sum does not depend on the
        # order rows arrive in; only the positions in runs of repeated keys are re-sorted
        repeated = np.zeros(first.shape[0], dtype=bool)
        repeated[1:] = ~first[1:]
        repeated[:-1] |= ~first[1:]
        positions = np.flatnonzero(repeated)
        rows = order[positions]
        order[positions] = rows[np.lexsort((ratings[rows], key[rows]))]
    dst, src, ratings = dst[order], src[order], ratings[order]
    if not first.all():
        starts = np.flatnonzero(first)
        ratings = sum_runs(ratings, starts)
        dst, src = dst[starts], src[starts]
    with np.errstate(over="ignore"):  # a sum beyond float32 becomes inf, which build_rating_blocks reports
        ratings = ratings.astype(np.float32)
    row_starts = np.flatnonzero(_run_starts(dst))  # dst is sorted: its runs are the CSR rows
    dst_ids = dst[row_starts]
    indptr = np.append(row_starts, dst.shape[0]).astype(np.int64)
    counts = np.diff(indptr)

    unique_src, rank_in_unique = np.unique(src, return_inverse=True)
    src_block = block_of(unique_src, num_src_blocks)
    by_block = np.lexsort((unique_src, src_block))
    src_ids = unique_src[by_block]
    # local index of each rating's src: position of src in src_ids
    local_of_unique = np.empty_like(by_block)
    local_of_unique[by_block] = np.arange(by_block.shape[0])
    indices = local_of_unique[rank_in_unique].astype(np.int32)
    src_offsets = np.zeros(num_src_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(src_block, minlength=num_src_blocks), out=src_offsets[1:])
    positive_rows = np.repeat(np.arange(dst_ids.shape[0]), counts)[ratings > 0]
    n_positive = np.bincount(positive_rows, minlength=dst_ids.shape[0]).astype(np.int32)
    return InBlock(dst_ids, indptr, indices, ratings, src_ids, src_offsets, n_positive)


def _unsigned(ids: np.ndarray) -> np.ndarray:
    """int32 ids as uint64 in the same order (shifted by 2^31)."""
    return (ids.astype(np.int64) + 2**31).astype(np.uint64)


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the positions where a run of equal values starts."""
    starts = np.ones(values.shape[0], dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return starts


def sum_runs(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Float64 sums of the runs ``values[starts[i]:starts[i+1]]``, each added left to right.

    ``values`` is (n,); ``starts`` is (r,), sorted, ``starts[0] == 0``; the result is (r,) float64.

    ``np.add.reduceat`` adds a run of 3 or more with several partial sums (SIMD), which can differ in
    the last bit from :func:`ordered_sum`'s left-to-right order (fold-in and ingest sum strengths with
    it). Here the j-th value of every run of up to ``SHORT_RUN`` values is added in one vectorised step;
    the few longer runs (a bot's millions of clicks on one item) are each added by ``np.add.accumulate``,
    which also goes left to right, so one huge run costs one pass, not one numpy call per value.
    """
    lengths = np.diff(np.append(starts, values.shape[0]))
    summed = np.empty(lengths.shape[0], dtype=np.float64)
    short = np.flatnonzero(lengths <= SHORT_RUN)
    short_lengths = lengths[short]
    longest_first = np.argsort(-short_lengths, kind="stable")
    run_starts = starts[short][longest_first]
    ascending = np.sort(short_lengths)
    acc = values[run_starts].astype(np.float64, copy=True)
    for j in range(1, int(short_lengths.max(initial=1))):
        live = short_lengths.shape[0] - int(np.searchsorted(ascending, j, side="right"))  # runs longer than j
        acc[:live] += values[run_starts[:live] + j]
    summed[short[longest_first]] = acc
    for run in np.flatnonzero(lengths > SHORT_RUN):
        summed[run] = np.add.accumulate(values[starts[run] : starts[run] + lengths[run]], dtype=np.float64)[-1]
    return summed


#: Duplicate runs up to this length are summed together, position by position (see :func:`sum_runs`).
SHORT_RUN = 64


def ordered_sum(column: str) -> Column:
    """Aggregate: the float64 sum of ``column`` over a group, added in ascending value order.

    A plain ``F.sum`` adds in arrival order, which depends on partitioning and retries; floating point
    is not associative, so the same rows could sum differently. This is the order :func:`make_in_block`
    sums duplicate ratings in, so every stage that sums strengths agrees with training.
    """
    return F.aggregate(F.array_sort(F.collect_list(column)), F.lit(0.0).cast("double"), lambda acc, x: acc + x)


def select_ratings(ratings: DataFrame, user_col: str, item_col: str, rating_col: str) -> DataFrame:
    """Check the input's columns and types on the driver (no pass over the data).

    Returns columns ``user``, ``item`` (integer types kept, any other numeric type as double) and
    ``rating`` double. The *values* (ids integral and in the Int range, as MLlib's ``checkIntegers``;
    ratings not null, NaN, infinite or beyond float32's range) are checked by :func:`build_rating_blocks`
    in the same pass that cuts the ratings into blocks, and a bad value raises :class:`~mf_spark.errors.InputDataError` naming
    the column. Duplicate (user, item) rows are summed inside :func:`make_in_block` (MLlib keeps them
    and so counts their terms twice; summing is the usual meaning of repeated events).
    """
    # MLlib: an empty ratingCol means every row rates 1.0
    for col in (user_col, item_col, *([rating_col] if rating_col else [])):
        if col not in ratings.columns:
            raise InputDataError(f"ImplicitALS: input has no column '{col}' (columns: {', '.join(ratings.columns)})")
    schema = {f.name: f.dataType for f in ratings.schema.fields}
    for col in (user_col, item_col):
        if not isinstance(schema[col], T.NumericType):
            raise InputDataError(f"ImplicitALS: column '{col}' must be numeric integer ids, got {schema[col].simpleString()}")
    if rating_col and not isinstance(schema[rating_col], T.NumericType):
        raise InputDataError(f"ImplicitALS: column '{rating_col}' must be numeric, got {schema[rating_col].simpleString()}")

    def id_column(col: str, name: str):
        integral = isinstance(schema[col], T.IntegerType | T.LongType | T.ShortType | T.ByteType)
        return (F.col(col) if integral else F.col(col).cast("double")).alias(name)

    return ratings.select(
        id_column(user_col, "user"), id_column(item_col, "item"),
        (F.col(rating_col).cast("double") if rating_col else F.lit(1.0)).alias("rating"),
    )


def _checked_ids(column: pa.Array) -> tuple[np.ndarray, int]:
    """``(ids as int32, number of bad values)``: null, fractional, non-finite or outside the Int range.
    Bad values become 0 so the pass can finish; the caller fails when the count is not 0."""
    nulls = column.null_count
    if pa.types.is_integer(column.type):
        values = column.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        bad = (values < INT_MIN) | (values > INT_MAX)
    else:
        values = column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values < INT_MIN) | (values > INT_MAX) | (np.floor(values) != values)
    n_bad = int(bad.sum())
    if n_bad:
        values = np.where(bad, 0, values)
    return values.astype(np.int32), n_bad + nulls


def _checked_ratings(column: pa.Array) -> tuple[np.ndarray, int]:
    """``(ratings as float64, number of null, NaN, infinite or float32-overflowing values)``; bad values
    become 0. The blocks hold float32 (as MLlib's): a larger value would train an all-NaN model."""
    values = column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (np.abs(values) > FLOAT32_MAX)
    n_bad = int(bad.sum())
    if n_bad:
        values = np.where(bad, 0.0, values)
    return values, n_bad + column.null_count


def make_out_block(in_block: InBlock, num_src_blocks: int) -> dict[int, np.ndarray]:
    """Out-block of this block's entities when they are the *fixed* side.

    ``{other block b: positions into in_block.dst_ids}`` of the entities rated together with some
    entity of block ``b``, sorted by id: exactly what block ``b``'s :class:`InBlock` expects from us.
    Each value is a (n_b,) int32 array, ``n_b`` the number of this block's entities block ``b`` needs.
    """
    src_ids = in_block.src_ids[in_block.indices]
    other_block = block_of(src_ids, num_src_blocks)
    rows = np.repeat(np.arange(in_block.dst_ids.shape[0]), np.diff(in_block.indptr))
    out = {}
    for b in np.unique(other_block):
        out[int(b)] = np.unique(rows[other_block == b]).astype(np.int32)
    return out


USER_SIDE, ITEM_SIDE = 0, 1
_STATS = 2
_CHUNK_SCHEMA = T.StructType([
    T.StructField("side", T.IntegerType()),
    T.StructField("block", T.IntegerType()),
    T.StructField("payload", T.BinaryType()),
])


#: Ratings per chunk payload (16 bytes each: two int32 ids and a float64), and payload bytes per Arrow
#: batch. A binary column holds at most 2 GiB (int32 offsets): a partition of 67M ratings or more, one
#: large unsplittable file, made a single batch that pyarrow could not build.
MAX_CHUNK_RATINGS = 1 << 23
MAX_BATCH_BYTES = 256 << 20


def _encode_partition(batches, num_user_blocks: int, num_item_blocks: int,
                      max_chunk_ratings: int = MAX_CHUNK_RATINGS, max_batch_bytes: int = MAX_BATCH_BYTES):
    """``mapInArrow`` body: check one input partition and cut it into per-(side, block) chunks.

    Yields rows ``(side, block, payload)``: for ``USER_SIDE`` a payload holds ``(user, item, rating)``
    arrays of at most ``max_chunk_ratings`` of the partition's ratings whose user falls in ``block``,
    for ``ITEM_SIDE`` ``(item, user, rating)`` by item block, and one ``_STATS`` row holds
    ``(rows, bad users, bad items, bad ratings)``. Python sees Arrow batches, never single rows; a
    batch holds at most about ``max_batch_bytes`` of payloads.
    """
    users, items, values = [], [], []
    stats = np.zeros(4, dtype=np.int64)
    for batch in batches:
        user, bad_user = _checked_ids(batch.column(0))
        item, bad_item = _checked_ids(batch.column(1))
        rating, bad_rating = _checked_ratings(batch.column(2))
        stats += (batch.num_rows, bad_user, bad_item, bad_rating)
        users.append(user)
        items.append(item)
        values.append(rating)
    if not users:
        return
    user, item, rating = np.concatenate(users), np.concatenate(items), np.concatenate(values)
    sides, blocks, payloads = [_STATS], [0], [pickle.dumps(stats.tolist())]
    batch_bytes = 0
    for side, dst, src, num_blocks in ((USER_SIDE, user, item, num_user_blocks), (ITEM_SIDE, item, user, num_item_blocks)):
        block = block_of(dst, num_blocks)
        order = np.argsort(block, kind="stable")
        bounds = np.searchsorted(block[order], np.arange(num_blocks + 1))
        for b in range(num_blocks):
            for start in range(bounds[b], bounds[b + 1], max_chunk_ratings):
                rows = order[start : min(start + max_chunk_ratings, bounds[b + 1])]
                sides.append(side)
                blocks.append(b)
                payloads.append(pickle.dumps((dst[rows], src[rows], rating[rows]), protocol=5))
                batch_bytes += len(payloads[-1])
                if batch_bytes >= max_batch_bytes:
                    yield _chunk_batch(sides, blocks, payloads)
                    sides, blocks, payloads, batch_bytes = [], [], [], 0
    if payloads:
        yield _chunk_batch(sides, blocks, payloads)


def _chunk_batch(sides: list[int], blocks: list[int], payloads: list[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(sides, pa.int32()), pa.array(blocks, pa.int32()), pa.array(payloads, pa.binary())],
        schema=_CHUNK_ARROW_SCHEMA,
    )


_CHUNK_ARROW_SCHEMA = pa.schema([("side", pa.int32()), ("block", pa.int32()), ("payload", pa.binary())])


#: Bytes of one rating block's arrays beyond which the fit stops with the block count to set. A block
#: is cached as one pickled value, and PySpark refuses values of 2 GiB or more ("can not serialize
#: object larger than 2G") after ingest, with no word of which setting to change.
MAX_IN_BLOCK_BYTES = (1 << 31) - (1 << 26)
#: Marks the task error :func:`build_rating_blocks` turns into a ConfigError.
_TOO_LARGE = "MF_SPARK_RATING_BLOCK_TOO_LARGE"


def in_block_bytes(in_block: InBlock) -> int:
    return sum(getattr(in_block, f.name).nbytes for f in fields(InBlock))


def _in_blocks_of_side(chunks: RDD, side: int, num_partitions: int, num_src_blocks: int, max_bytes: int) -> RDD:
    """``RDD[(block, InBlock)]`` of one side from the encoded chunks: one shuffle into
    ``num_partitions`` partitions (see :func:`num_task_partitions`)."""

    def build(records):
        for block, payloads in group_by_block(records):
            parts = [pickle.loads(payload) for payload in payloads]
            dst, src, ratings = (np.concatenate([p[i] for p in parts]) for i in range(3))
            in_block = make_in_block(dst, src, ratings, num_src_blocks)
            size = in_block_bytes(in_block)
            if size > max_bytes:
                raise ValueError(f"{_TOO_LARGE} side={side} block={block} ratings={in_block.nnz} bytes={size}")
            yield block, in_block

    return (
        chunks.filter(lambda row: row[0] == side)
        .map(lambda row: (row[1], row[2]))
        .partitionBy(num_partitions, block_partition)
        .mapPartitions(build, preservesPartitioning=True)
    )


@dataclass
class RatingBlocks:
    """The cached rating blocks of both sides, and their sizes.

    ``user_in`` / ``item_in``: ``RDD[(block, InBlock)]`` with users / items as dst, persisted and
    partitioned by :func:`block_partition`. Out-blocks (the routing of one side's factors when it is
    the fixed side) are only needed when that side is routed rather than broadcast, so
    :meth:`out_blocks` builds them on first use.
    """

    user_in: RDD
    item_in: RDD
    num_user_blocks: int
    num_item_blocks: int
    user_partitions: int
    item_partitions: int
    nnz: int
    n_users: int
    n_items: int
    storage_level: StorageLevel
    #: Most fixed-side entities one block is solved against (``len(src_ids)``): a routed half-step
    #: gathers that many factors in one task. Users per item block, items per user block.
    max_users_per_item_block: int = 0
    max_items_per_user_block: int = 0
    _out: dict = field(default_factory=dict)

    def out_blocks(self, side: int) -> RDD:
        """``RDD[(block, {other block: positions})]`` of ``side``'s entities as the fixed side."""
        if side not in self._out:
            in_blocks = self.user_in if side == USER_SIDE else self.item_in
            num_src = self.num_item_blocks if side == USER_SIDE else self.num_user_blocks
            self._out[side] = in_blocks.mapValues(lambda ib: make_out_block(ib, num_src)).persist(self.storage_level)
        return self._out[side]

    def unpersist(self) -> None:
        for rdd in (self.user_in, self.item_in, *self._out.values()):
            rdd.unpersist()


def _block_too_large(side: int, block: int, nnz: int, size: int, num_blocks: int, max_bytes: int) -> Exception:
    from mf_spark.errors import ConfigError

    name, param = ("user", "numUserBlocks") if side == USER_SIDE else ("item", "numItemBlocks")
    # blocks are filled by hash, so they are about equal: scale the count, with a margin for the spread
    needed = max(num_blocks + 1, -(-num_blocks * size * 5 // (max_bytes * 4)))
    return ConfigError(
        f"ImplicitALS: {name} block {block} of {num_blocks} holds {nnz:,} ratings ({size / 2**30:.2f} GiB; a "
        f"block is cached as one value of less than 2 GiB): set {param} (train.num_{name}_blocks) to at "
        f"least {needed}"
    )


def build_rating_blocks(
    ratings: DataFrame,
    num_user_blocks: int,
    num_item_blocks: int,
    storage_level: StorageLevel,
    column_names: tuple[str, str, str] = ("user", "item", "rating"),
) -> RatingBlocks:
    """Check the ratings' values and build the in-blocks of both sides, in two Spark jobs.

    One ``mapInArrow`` pass checks every value and cuts each input partition into per-(side, block)
    chunks (numpy arrays); one shuffle per side gathers each block's chunks, where
    :func:`make_in_block` sums duplicates and builds the CSR arrays. This mirrors MLlib's
    ``partitionRatings`` + ``makeBlocks``, without a row-by-row pass in Python.

    Parameters
    ----------
    ratings : DataFrame
        Output of :func:`select_ratings` (columns ``user``, ``item``, ``rating``).
    num_user_blocks, num_item_blocks : int
    storage_level : StorageLevel
        Level of the cached blocks.
    column_names : tuple of str
        The user, item and rating columns' names in the caller's input, for error messages.

    Raises
    ------
    InputDataError
        The input is empty, or some id is null, fractional or outside the Int range, or some rating is
        null, NaN, infinite or beyond float32's range; the message names the input column.
    ConfigError
        A block's ratings exceed :data:`MAX_IN_BLOCK_BYTES`; the message names the block count to set.
    """
    max_chunk_ratings, max_batch_bytes = MAX_CHUNK_RATINGS, MAX_BATCH_BYTES  # read here: executors see no patch
    sc = ratings.sparkSession.sparkContext
    user_partitions = num_task_partitions(sc, num_user_blocks)
    item_partitions = num_task_partitions(sc, num_item_blocks)
    chunks = (
        ratings.select("user", "item", "rating")
        .mapInArrow(lambda batches: _encode_partition(batches, num_user_blocks, num_item_blocks,
                                                      max_chunk_ratings, max_batch_bytes), _CHUNK_SCHEMA)
        .rdd.map(tuple)
        .persist(storage_level)
    )
    max_in_block_bytes = MAX_IN_BLOCK_BYTES
    user_in = _in_blocks_of_side(chunks, USER_SIDE, user_partitions, num_item_blocks, max_in_block_bytes)
    item_in = _in_blocks_of_side(chunks, ITEM_SIDE, item_partitions, num_user_blocks, max_in_block_bytes)
    user_in, item_in = user_in.persist(storage_level), item_in.persist(storage_level)
    # one job computes the chunks once (cached) and both sides' blocks; it returns only small summaries
    try:
        summaries = sc.union([
            chunks.filter(lambda row: row[0] == _STATS).map(lambda row: (_STATS, pickle.loads(row[2]))),
            # the third figure: pairs whose duplicate rows sum beyond float32 (each row alone was checked)
            user_in.map(lambda kv: (USER_SIDE, (kv[1].dst_ids.shape[0], kv[1].nnz,
                                                int(np.count_nonzero(~np.isfinite(kv[1].ratings))),
                                                kv[1].src_ids.shape[0]))),
            item_in.map(lambda kv: (ITEM_SIDE, (kv[1].dst_ids.shape[0], kv[1].nnz, 0, kv[1].src_ids.shape[0]))),
        ]).collect()
    except Exception as exc:
        too_large = re.search(_TOO_LARGE + r" side=(\d) block=(\d+) ratings=(\d+) bytes=(\d+)", str(exc))
        if too_large is None:
            raise
        for rdd in (chunks, user_in, item_in):
            rdd.unpersist()
        side, block, nnz, size = (int(g) for g in too_large.groups())
        raise _block_too_large(side, block, nnz, size, num_user_blocks if side == USER_SIDE else num_item_blocks,
                               max_in_block_bytes) from None
    chunks.unpersist()
    problems = _rating_problems(summaries, column_names)
    if problems:
        user_in.unpersist()
        item_in.unpersist()
        raise InputDataError(
            "ImplicitALS only supports integer ids in the Int range and finite ratings: " + "; ".join(problems)
        )
    user_sizes = [v for k, v in summaries if k == USER_SIDE]
    item_sizes = [v for k, v in summaries if k == ITEM_SIDE]
    if not user_sizes:
        # nothing to factorise; without this check the first half-step fails deep in numpy
        user_in.unpersist()
        item_in.unpersist()
        raise InputDataError(
            "ImplicitALS: no ratings to train on (the input with columns "
            + ", ".join(f"'{name}'" for name in column_names) + " is empty)"
        )
    return RatingBlocks(
        user_in, item_in, num_user_blocks, num_item_blocks, user_partitions, item_partitions,
        nnz=int(sum(v[1] for v in user_sizes)), n_users=int(sum(v[0] for v in user_sizes)),
        n_items=int(sum(v[0] for v in item_sizes)), storage_level=storage_level,
        max_users_per_item_block=int(max(v[3] for v in item_sizes)),
        max_items_per_user_block=int(max(v[3] for v in user_sizes)),
    )


def _rating_problems(summaries: list[tuple[int, Any]], names: tuple[str, str, str]) -> list[str]:
    """What is wrong with the input's values, from the encode pass's counts and the user blocks' overflows.

    ``summaries`` holds ``(_STATS, [rows, bad users, bad items, bad ratings])`` per input partition and
    ``(USER_SIDE, (entities, nnz, overflowing sums, sources))`` per user block.
    """
    stats = np.sum([v for k, v in summaries if k == _STATS] or [[0, 0, 0, 0]], axis=0)
    problems = []
    for name, count in zip(names[:2], stats[1:3]):
        if count:
            problems.append(f"{count} values of '{name}' are null, fractional or outside the Int range")
    if stats[3]:
        problems.append(f"{stats[3]} values of '{names[2]}' are null, NaN, infinite or beyond float32's range")
    overflowing_sums = sum(v[2] for k, v in summaries if k == USER_SIDE)
    if overflowing_sums:
        problems.append(f"{overflowing_sums} ('{names[0]}', '{names[1]}') pairs have duplicate rows whose "
                        f"'{names[2]}' values sum beyond float32's range")
    return problems
