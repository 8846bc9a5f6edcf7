"""The ALS iteration loop on Spark: initialise, alternate half-steps, checkpoint, report the loss.

Mirrors ``ALS.train`` of Spark MLlib's ``ALS.scala``: rating blocks are built once and cached
(:mod:`mf_spark.als.blocks`); each half-step computes the Gramian of the fixed side once, routes every
fixed factor at most once to each block that needs it (one shuffle) or broadcasts the fixed side when
it is small, and solves every block with the vectorised kernels of :mod:`mf_spark.als.solve`.

References
----------
Hu, Koren and Volinsky, "Collaborative Filtering for Implicit Feedback Datasets", ICDM 2008.
Takacs, Pilaszy and Tikk, "Applications of the Conjugate Gradient Method for Implicit Feedback
Collaborative Filtering", RecSys 2011 (the ``cg`` solver).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pyspark import RDD, AccumulatorParam, Broadcast, SparkContext, StorageLevel
from pyspark.accumulators import _accumulatorRegistry
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.als import solve
from mf_spark.als.blocks import (
    ITEM_SIDE,
    USER_SIDE,
    InBlock,
    RatingBlocks,
    block_partition,
    build_rating_blocks,
    group_by_block,
)
from mf_spark.als.params import SolveParams
from mf_spark.blas import task_blas_threads
from mf_spark.errors import ConfigError

log = logging.getLogger(__name__)



@dataclass
class FactorBlock:
    """Factors of one block: ``ids`` (n,) int32 sorted, ``factors`` (n, rank) float32, and the loss
    terms of the half-step that produced them: on the user side ``data_loss`` is the users' data term
    plus their regularisation term, on the item side ``reg_loss`` is the items' regularisation term."""

    ids: np.ndarray
    factors: np.ndarray
    data_loss: float = 0.0
    reg_loss: float = 0.0


@dataclass
class TrainSettings:
    """Everything :func:`train_implicit` needs, as plain values."""

    rank: int = 10
    max_iter: int = 10
    solve: SolveParams = field(default_factory=SolveParams)
    num_user_blocks: int = 10
    num_item_blocks: int = 10
    seed: int = 0
    checkpoint_interval: int = 10
    intermediate_storage: StorageLevel = field(default_factory=lambda: StorageLevel.MEMORY_AND_DISK)
    broadcast_threshold_bytes: int = 64 * 1024 * 1024
    compute_loss: bool = True


@dataclass
class TrainResult:
    """What :func:`train_implicit` returns: the factors as ``RDD[(block, FactorBlock)]`` (one
    ``(n_block, rank)`` float32 matrix per block, with its ids), the loss and seconds of each iteration."""

    user_factors: RDD
    item_factors: RDD
    training_loss: list[float]
    iteration_seconds: list[float]
    #: the broadcasts the factors' lineage still reads (those since the last checkpoint); see
    #: :attr:`mf_spark.als.model.ImplicitALSModel.trainingBroadcasts`
    broadcasts: list[Broadcast] = field(default_factory=list)


def random_factors(n: int, rank: int, seed: int, side: int, block: int) -> np.ndarray:
    """(n, rank) float32 unit-norm Gaussian rows, seeded per (seed, side, block), as MLlib's ``initialize``."""
    rng = np.random.default_rng([seed % 2**64, side, block])  # MLlib's seed is a Long: keep all 64 bits
    factors = rng.standard_normal((n, rank))
    factors /= np.linalg.norm(factors, axis=1, keepdims=True)
    return factors.astype(np.float32)


def factor_frame_to_blocks(factors: DataFrame, num_blocks: int, rank: int, num_partitions: int) -> RDD:
    """``(id int, features array<float>)`` -> ``RDD[(block, FactorBlock)]`` in ``num_partitions``
    partitions (for warm starts)."""
    schema = T.StructType([T.StructField("block", T.IntegerType()), T.StructField("payload", T.BinaryType())])

    def pack(table: pa.Table) -> pa.Table:
        ids = table.column("id").to_numpy().astype(np.int32)
        flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        matrix = np.asarray(flat, dtype=np.float32).reshape(len(ids), -1)
        if matrix.shape[1] != rank:
            raise ValueError(f"initial model has rank {matrix.shape[1]}, expected {rank}")
        order = np.argsort(ids, kind="stable")
        payload = pickle.dumps(FactorBlock(ids[order], matrix[order]), protocol=5)
        return pa.table({"block": pa.array([int(table.column("block")[0].as_py())], pa.int32()),
                         "payload": pa.array([payload], pa.binary())})

    packed = (
        factors.select(F.col("id").cast("int"), "features")
        .withColumn("block", F.pmod("id", F.lit(num_blocks)).cast("int"))
        .groupBy("block")
        .applyInArrow(pack, schema)
    )
    unpacked = packed.rdd.map(lambda row: (row[0], pickle.loads(row[1])))
    return unpacked.partitionBy(num_partitions, block_partition)


@dataclass
class _BlockParts:
    """What one block's records of a co-partitioned union hold: its in-block, its factor block, and any
    other values (routed factor messages, an out-block)."""

    in_block: InBlock | None = None
    factors: FactorBlock | None = None
    others: list = field(default_factory=list)


def _blocks_of_partition(records) -> list[tuple[int, _BlockParts]]:
    """Split one partition of a co-partitioned union by block, in block order (a partition may hold
    several blocks: :func:`~mf_spark.als.blocks.num_task_partitions`)."""
    grouped = []
    for block_id, values in group_by_block(records):
        parts = _BlockParts()
        for value in values:
            if isinstance(value, InBlock):
                parts.in_block = value
            elif isinstance(value, FactorBlock):
                parts.factors = value
            else:
                parts.others.append(value)
        grouped.append((block_id, parts))
    return grouped


def initialize(in_blocks: RDD, rank: int, seed: int, side: int, initial: RDD | None) -> RDD:
    """Initial factors for every dst entity of ``in_blocks``.

    Known ids of ``initial`` (a warm start) keep their factors; the others get random ones. The random
    draw does not depend on which ids are known, so adding a model never changes the new ids' start.
    """

    def init_partition(records):
        for block, parts in _blocks_of_partition(records):
            in_block, known = parts.in_block, parts.factors
            if in_block is None:
                continue
            factors = random_factors(in_block.dst_ids.shape[0], rank, seed, side, block)
            if known is not None and known.ids.shape[0]:
                pos = np.searchsorted(known.ids, in_block.dst_ids)
                pos = np.minimum(pos, known.ids.shape[0] - 1)
                hit = known.ids[pos] == in_block.dst_ids
                factors[hit] = known.factors[pos[hit]]
            yield block, FactorBlock(in_block.dst_ids, factors)

    source = in_blocks if initial is None else in_blocks.union(initial)
    return source.mapPartitions(init_partition, preservesPartitioning=True)


def _fixed_side_lookup(blocks: list[tuple[int, FactorBlock]]) -> tuple[np.ndarray | None, np.ndarray]:
    """Driver-side table of all fixed factors: dense by id when ids are dense, else sorted by id."""
    ids = np.concatenate([b.ids for _, b in blocks])
    factors = np.concatenate([b.factors for _, b in blocks])
    if ids.shape[0] and ids.min() >= 0 and ids.max() < 2 * ids.shape[0] + 1024:
        dense = np.zeros((int(ids.max()) + 1, factors.shape[1]), dtype=np.float32)
        dense[ids] = factors
        return None, dense
    order = np.argsort(ids, kind="stable")
    return ids[order], factors[order]


def half_step(
    dst_in_blocks: RDD,
    src_out_blocks: RDD,
    src_factors: RDD,
    prev_dst_factors: RDD,
    num_dst_partitions: int,
    n_src_total: int,
    params: SolveParams,
    compute_data_loss: bool,
    fixed_side: Broadcast,
) -> RDD:
    """Solve every dst block against the fixed src factors; returns ``RDD[(block, FactorBlock)]``.

    ``fixed_side`` broadcasts ``(src_gramian, lookup)``: the ``(rank, rank)`` Gramian of all src factors
    and, when the whole src side is broadcast (``src_out_blocks`` is None), the ``(sorted_ids, table)``
    lookup of its factors. Otherwise ``lookup`` is None and each src block sends only the factors a dst
    block needs (its out-block), one message per (src block, dst block) pair. The Gramian travels in the
    broadcast rather than in the closure because every closure stays in the lineage until the next
    checkpoint: at rank 256 a captured Gramian grew each task binary by 0.5 MiB per half-step.
    """

    def solve_partition(records):
        for block, parts in _blocks_of_partition(records):
            if parts.in_block is None:
                continue
            with task_blas_threads():
                result = solve_one(block, parts.in_block, parts.factors, parts.others)
            yield result

    def solve_one(block, in_block, prev, messages):
        src_gramian, lookup = fixed_side.value
        if lookup is not None:
            sorted_ids, table = lookup
            rows = in_block.src_ids if sorted_ids is None else np.searchsorted(sorted_ids, in_block.src_ids)
            src_local = table[rows]
        else:
            messages.sort(key=lambda m: m[0])
            src_local = np.concatenate([m[1] for m in messages]) if messages else np.zeros((0, src_gramian.shape[0]), np.float32)
        if compute_data_loss:
            # the data term and this side's regularisation term, from the solver's own quantities
            factors, data_loss = solve.solve_block_with_objective(
                in_block.indptr, in_block.indices, in_block.ratings, src_local, src_gramian, n_src_total, params,
                init=prev.factors)
            reg_loss = 0.0
        else:
            factors = solve.solve_block(in_block.indptr, in_block.indices, in_block.ratings, src_local, src_gramian,
                                        n_src_total, params, init=prev.factors)
            data_loss = 0.0
            reg_loss = solve.regularization_loss(in_block.n_positive, factors, n_src_total, params)
        return block, FactorBlock(in_block.dst_ids, factors, float(data_loss), float(reg_loss))

    inputs = [dst_in_blocks, prev_dst_factors]
    if src_out_blocks is not None:

        def route(records):
            for src_block, parts in _blocks_of_partition(records):
                out_block = parts.others[0] if parts.others else None
                if parts.factors is None or out_block is None:
                    continue
                for dst_block, positions in out_block.items():
                    yield dst_block, (src_block, parts.factors.factors[positions])

        messages = (
            src_out_blocks.union(src_factors)
            .mapPartitions(route)
            .partitionBy(num_dst_partitions, block_partition)
        )
        inputs.append(messages)
    merged = inputs[0]
    for part in inputs[1:]:
        merged = merged.union(part)
    return merged.mapPartitions(solve_partition, preservesPartitioning=True)


@dataclass
class _SideStats:
    gramian: np.ndarray
    count: int
    data_loss: float
    reg_loss: float
    blocks: list[tuple[int, FactorBlock]] | None


class _BlockStatsParam(AccumulatorParam):
    """Per-block ``(gramian, count, data_loss, reg_loss)`` keyed by block id.

    A task that runs again (a retry, or a lost cache rebuilt from lineage) overwrites its block's entry
    with the same values, so the merged result does not depend on retries.
    """

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, value1: dict, value2: dict) -> dict:
        value1.update(value2)
        return value1


def _materialize(
    factors: RDD, rank: int, level: StorageLevel, collect_factors: bool, checkpoint: bool = False
) -> tuple[RDD, _SideStats]:
    """Persist ``factors`` (``RDD[(block, FactorBlock)]``), run the one job that computes them, and gather
    what the next half-step needs: the Gramian, sizes and loss terms, and all factors when the side is
    broadcast. Returns the persisted RDD and those statistics.

    The statistics ride along with that job in an accumulator, so no second pass over the factors is
    needed. Sums run in block order on the driver, so the Gramian and the loss do not depend on task
    timing.
    """
    stats = factors.context.accumulator({}, _BlockStatsParam())

    def record(records):
        for block, factor_block in records:
            stats.add({block: (solve.gramian(factor_block.factors), factor_block.ids.shape[0],
                               factor_block.data_loss, factor_block.reg_loss)})
            yield block, factor_block

    tracked = factors.mapPartitions(record, preservesPartitioning=True).persist(level)
    if checkpoint:
        tracked.checkpoint()
    if collect_factors:
        blocks = sorted(tracked.collect(), key=lambda kv: kv[0])
    else:
        blocks = None
        # a JVM-side action: PySpark's count() would stack a second Python worker on each task
        tracked._jrdd.count()
    by_block = [stats.value[b] for b in sorted(stats.value)]
    # PySpark keeps every accumulator in a module-level registry for the driver's life: each half-step's
    # left its per-block Gramians there (a tuning run or a long-lived session grew without bound). The
    # driver's update handler ignores ids no longer registered, e.g. from a recomputed cache block.
    _accumulatorRegistry.pop(stats.aid, None)
    gramian = np.zeros((rank, rank), dtype=np.float64)
    for entry in by_block:
        gramian += entry[0]
    side = _SideStats(gramian, sum(e[1] for e in by_block), sum(e[2] for e in by_block), sum(e[3] for e in by_block),
                      blocks)
    return tracked, side


#: Bytes of one block's factors (float32) beyond which a fit is refused before it starts. A block's
#: factors travel as one binary value (Spark's limit: 2 GiB) and one Arrow list (int32 offsets) when
#: written out; half the limit leaves room for the copy pickling makes.
MAX_BLOCK_FACTOR_BYTES = 1 << 30


def check_block_sizes(n_users: int, n_items: int, settings: TrainSettings) -> None:
    """Refuse a fit whose factor blocks would exceed :data:`MAX_BLOCK_FACTOR_BYTES` (it failed only when
    the trained factors were written, after the whole fit).

    Raises
    ------
    ConfigError
        Naming the block count to raise and the smallest that fits.
    """
    for side, n, blocks, param in (("user", n_users, settings.num_user_blocks, "numUserBlocks"),
                                   ("item", n_items, settings.num_item_blocks, "numItemBlocks")):
        per_block = -(-n // blocks) * settings.rank * 4
        if per_block > MAX_BLOCK_FACTOR_BYTES:
            needed = -(-n * settings.rank * 4 // MAX_BLOCK_FACTOR_BYTES)
            while -(-n // needed) * settings.rank * 4 > MAX_BLOCK_FACTOR_BYTES:
                needed += 1
            raise ConfigError(
                f"{param} = {blocks} puts about {-(-n // blocks)} {side}s of rank {settings.rank} in one block "
                f"({per_block / 2**30:.1f} GiB of factors; at most {MAX_BLOCK_FACTOR_BYTES / 2**30:.0f} GiB travel "
                f"as one value): set {param} (train.num_{side}_blocks) to at least {needed}"
            )


#: Routed factors one task gathers beyond which the fit logs a WARNING (see :func:`warn_routed_factors`).
ROUTED_FACTORS_WARN_BYTES = 1 << 30


def warn_routed_factors(blocks: RatingBlocks, rank: int, broadcast_users: bool, broadcast_items: bool) -> None:
    """Log a WARNING when solving one block gathers more than :data:`ROUTED_FACTORS_WARN_BYTES` of routed
    factors in one task.

    A routed (not broadcast) half-step hands each dst block the factors of every src entity it rated,
    as MLlib does: with 40 ratings per user over 32 item blocks, 72% of all users reach each item block,
    so more blocks shrink this only slowly, and the task's Python worker needs about 2.3 times it
    (measured). Raising ``broadcastThreshold`` is no way out at that size; the warning names the
    figure so that executors can be sized (``spark.executor.pyspark.memory`` / ``memoryOverhead``).
    """
    for routed, src, dst, count, param in (
        (not broadcast_users, "user", "item", blocks.max_users_per_item_block, "numItemBlocks"),
        (not broadcast_items, "item", "user", blocks.max_items_per_user_block, "numUserBlocks"),
    ):
        size = count * rank * 4
        if routed and size > ROUTED_FACTORS_WARN_BYTES:
            log.warning("solving one %s block gathers the factors of up to %d %ss (%.1f GiB at rank %d) in one "
                        "task, and its Python worker needs about 2.3 times that: give executors the memory "
                        "(spark.executor.pyspark.memory or spark.executor.memoryOverhead) or raise %s "
                        "(docs/als.md, \"Blocks and tasks\")", dst, count, src, size / 2**30, rank, param)


def _with_checkpoint_dir(sc: SparkContext, settings: TrainSettings) -> TrainSettings:
    """``settings``, once the context has a checkpoint directory when they checkpoint: a temporary one in
    local mode; on a cluster none can be made up, and the settings returned do not checkpoint."""
    if not sc.getCheckpointDir() and settings.checkpoint_interval > 0:
        if sc.master.startswith("local"):
            from mf_spark.session import temporary_checkpoint_dir

            ckpt = temporary_checkpoint_dir("mf-spark-als-ckpt-")
            log.warning("no checkpoint dir set; checkpointing ALS factors to %s (set spark.checkpoint.dir on a "
                        "cluster)", ckpt)
            sc.setCheckpointDir(ckpt)
        else:
            # A driver-local directory would break on a multi-host cluster (executors write to their own
            # disks): run without checkpoints, as MLlib does, but say so.
            log.warning("no checkpoint dir set on master %s: ALS runs without checkpoints (long runs may fail "
                        "with a StackOverflowError); call spark.sparkContext.setCheckpointDir with a directory "
                        "every node shares", sc.master)
            return dataclasses.replace(settings, checkpoint_interval=-1)
    return settings


def train_implicit(
    spark: SparkSession,
    ratings: DataFrame,
    settings: TrainSettings,
    initial_user_factors: DataFrame | None = None,
    initial_item_factors: DataFrame | None = None,
    callback: Callable[[int, float, float], None] | None = None,
    column_names: tuple[str, str, str] = ("user", "item", "rating"),
) -> TrainResult:
    """Fit implicit ALS on ratings (columns ``user``, ``item``, ``rating``; duplicates are summed).

    Parameters
    ----------
    ratings : DataFrame
        Output of :func:`mf_spark.als.blocks.select_ratings`; its values are checked while the blocks
        are built (:class:`~mf_spark.errors.InputDataError` on a bad id or rating).
    settings : TrainSettings
    initial_user_factors, initial_item_factors : DataFrame, optional
        ``(id, features)`` tables of a previous model: a warm start.
    callback : callable, optional
        Called as ``callback(iteration, seconds, loss)`` after each iteration.
    column_names : tuple of str
        The caller's names of the user, item and rating columns, for error messages.

    Returns
    -------
    TrainResult
        Factor RDDs ``RDD[(block, FactorBlock)]`` (persisted) and the objective after each iteration.
    """
    sc = spark.sparkContext
    level = settings.intermediate_storage
    rank, num_user_blocks, num_item_blocks = settings.rank, settings.num_user_blocks, settings.num_item_blocks
    settings = _with_checkpoint_dir(sc, settings)

    started = time.perf_counter()
    blocks = build_rating_blocks(ratings, num_user_blocks, num_item_blocks, level, column_names)
    user_in, item_in = blocks.user_in, blocks.item_in
    log.info("ALS blocks built: %d ratings, %d users, %d items, %dx%d blocks, %.1fs",
             blocks.nnz, blocks.n_users, blocks.n_items, num_user_blocks, num_item_blocks, time.perf_counter() - started)
    check_block_sizes(blocks.n_users, blocks.n_items, settings)

    threshold = settings.broadcast_threshold_bytes
    broadcast_users = blocks.n_users * rank * 4 <= threshold
    broadcast_items = blocks.n_items * rank * 4 <= threshold
    warn_routed_factors(blocks, rank, broadcast_users, broadcast_items)
    user_out = None if broadcast_users else blocks.out_blocks(USER_SIDE)
    item_out = None if broadcast_items else blocks.out_blocks(ITEM_SIDE)

    init_users = None if initial_user_factors is None else factor_frame_to_blocks(
        initial_user_factors, num_user_blocks, rank, blocks.user_partitions)
    init_items = None if initial_item_factors is None else factor_frame_to_blocks(
        initial_item_factors, num_item_blocks, rank, blocks.item_partitions)

    user_factors, user_stats = _materialize(initialize(user_in, rank, settings.seed, USER_SIDE, init_users), rank,
                                            level, collect_factors=broadcast_users)
    item_factors, _ = _materialize(initialize(item_in, rank, settings.seed, ITEM_SIDE, init_items), rank, level,
                                   collect_factors=False)

    losses: list[float] = []
    seconds: list[float] = []
    broadcasts: list[Broadcast] = []
    checkpoint_files: list[str] = []  # of the last checkpointed iteration

    def broadcast_of(stats: _SideStats) -> Broadcast:
        # The previous half-step is materialised, so executors will not read its broadcast again:
        # unpersist (not destroy) it, since recomputing a lost partition before the next checkpoint
        # fetches it again from the driver. Without it every executor held two per iteration (each up to
        # broadcastThreshold bytes) until the next checkpoint, or to the end with checkpointing off.
        if broadcasts:
            broadcasts[-1].unpersist()
        lookup = None if stats.blocks is None else _fixed_side_lookup(stats.blocks)
        bc = sc.broadcast((stats.gramian, lookup))
        broadcasts.append(bc)
        return bc

    for iteration in range(1, settings.max_iter + 1):
        t0 = time.perf_counter()
        checkpoint = settings.checkpoint_interval > 0 and iteration % settings.checkpoint_interval == 0
        # items from users (MLlib's implicit order), then users from the new items
        new_items, item_stats = _materialize(
            half_step(item_in, user_out, user_factors, item_factors, blocks.item_partitions,
                      user_stats.count, settings.solve, False, broadcast_of(user_stats)),
            rank, level, collect_factors=broadcast_items, checkpoint=checkpoint)
        item_factors.unpersist()
        item_factors = new_items

        # after the last half-step no one reads the user factors on the driver
        new_users, user_stats = _materialize(
            half_step(user_in, item_out, item_factors, user_factors, blocks.user_partitions,
                      item_stats.count, settings.solve, settings.compute_loss, broadcast_of(item_stats)),
            rank, level, collect_factors=broadcast_users and iteration < settings.max_iter, checkpoint=checkpoint)
        user_factors.unpersist()
        user_factors = new_users
        if checkpoint:
            # Both sides' lineage now starts at their checkpoints, so no task reads the broadcasts of
            # earlier iterations again. This iteration's two stay: its RDDs, serialised into the next
            # iteration's tasks, still carry them. destroy() also deletes the driver's file of each
            # (PySpark keeps it until then), which otherwise stayed on the driver's disk for the whole
            # session: 12 per fit of maxIter 6, each up to broadcastThreshold bytes.
            for bc in broadcasts[:-2]:
                bc.destroy()
            del broadcasts[:-2]
            # ... and no task reads the previous checkpoint's files: delete them, as MLlib's
            # deletePreviousCheckpointFile. Spark's cleaner does so only when the session enables
            # cleanCheckpoints (the jobs do; a user's own session by default does not).
            _delete_checkpoint_files(sc, checkpoint_files)
            checkpoint_files = [f for f in (item_factors.getCheckpointFile(), user_factors.getCheckpointFile()) if f]

        diverged = not_finite_message(iteration, settings.solve, user=user_stats, item=item_stats)
        if diverged:
            blocks.unpersist()
            for rdd in (user_factors, item_factors):
                rdd.unpersist()
            for bc in broadcasts:
                bc.destroy()
            raise ConfigError(diverged)
        loss = user_stats.data_loss + user_stats.reg_loss + item_stats.reg_loss
        elapsed = time.perf_counter() - t0
        losses.append(loss if settings.compute_loss else float("nan"))
        seconds.append(elapsed)
        log.info("ALS iteration %d/%d loss=%.6e seconds=%.2f", iteration, settings.max_iter, loss, elapsed)
        if callback is not None:
            callback(iteration, elapsed, losses[-1])

    blocks.unpersist()
    for bc in broadcasts:
        bc.unpersist()
    log.info("ALS fit: %d iterations in %.1fs", settings.max_iter, time.perf_counter() - started)
    return TrainResult(user_factors, item_factors, losses, seconds, broadcasts)


def not_finite_message(iteration: int, params: SolveParams, **sides: _SideStats) -> str | None:
    """Why the fit must stop, when a side's new factors hold NaN or infinity (seen in its Gramian, which
    sums them all); None otherwise.

    Without this check the fit went on: a NaN item factor made every user's system NaN, CG then left the
    users at their starting factors, and the model recommended from random factors with ``loss=nan``.
    """
    bad = [name for name, stats in sides.items() if not np.all(np.isfinite(stats.gramian))]
    if not bad:
        return None
    if params.solver == "cg":
        why = ("solver 'cg' works in float32, which confidences alpha*|r| or regularisation weights of "
               "about 1e19 and more overflow; use solver 'cholesky', confidence 'log', or smaller "
               "ratings, alpha or regParam")
    else:
        why = "the confidences or regularisation weights overflow; use smaller ratings, alpha or regParam"
    return (f"ImplicitALS diverged in iteration {iteration}: the new {' and '.join(bad)} factors are not "
            f"finite (alpha = {params.alpha:g}, regParam = {params.reg_param:g}, confidence "
            f"'{params.confidence}', regularization '{params.regularization}'): {why}")


def _delete_checkpoint_files(sc, paths: list[str]) -> None:
    for path in paths:
        try:
            hadoop_path = sc._jvm.org.apache.hadoop.fs.Path(path)
            hadoop_path.getFileSystem(sc._jsc.hadoopConfiguration()).delete(hadoop_path, True)
        except Exception as exc:  # noqa: BLE001 - a leftover checkpoint must not fail the fit
            log.warning("could not delete the old checkpoint %s: %s", path, exc)


FACTOR_SCHEMA = T.StructType(
    [T.StructField("id", T.IntegerType(), False), T.StructField("features", T.ArrayType(T.FloatType(), False), False)]
)
_PAYLOAD_SCHEMA = T.StructType([T.StructField("block", T.IntegerType()), T.StructField("payload", T.BinaryType())])


def factors_to_frame(spark: SparkSession, factors: RDD) -> DataFrame:
    """``RDD[(block, FactorBlock)]`` -> DataFrame ``id int, features array<float>``.

    One binary row per block crosses into the JVM and ``mapInArrow`` unpacks it into Arrow batches:
    Python touches blocks, never single rows.
    """

    def unpack(batches):
        for batch in batches:
            for payload in batch.column(1).to_pylist():
                fb = pickle.loads(payload)
                n, k = fb.factors.shape
                offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
                features = pa.ListArray.from_arrays(offsets, pa.array(fb.factors.reshape(-1)))
                yield pa.RecordBatch.from_arrays([pa.array(fb.ids), features], schema=FACTOR_ARROW_SCHEMA)

    packed = spark.createDataFrame(factors.map(lambda kv: (kv[0], pickle.dumps(kv[1], protocol=5))), _PAYLOAD_SCHEMA)
    return packed.mapInArrow(unpack, FACTOR_SCHEMA)


FACTOR_ARROW_SCHEMA = pa.schema([pa.field("id", pa.int32(), False), pa.field("features", pa.list_(pa.field("element", pa.float32(), False)), False)])


#: Item factors (bytes as float32) up to which :func:`objective` may be asked for: it holds about three
#: copies on the driver. ALS's default broadcastThreshold.
OBJECTIVE_MAX_ITEM_BYTES = 64 * 1024 * 1024


def objective(
    spark: SparkSession,
    ratings: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    params: SolveParams,
    num_blocks: int = 4,
) -> float:
    """The exact training objective of any factor pair (ours or MLlib's) on validated ratings.

    ``sum_{all u,i} c_ui (p_ui - x_u.y_i)^2 + sum_u lambda_u |x_u|^2 + sum_i lambda_i |y_i|^2``, with the
    data term over *all* pairs computed by the Gramian trick per user block (never scoring all pairs).
    ``ratings`` comes from :func:`mf_spark.als.blocks.select_ratings`; every rated user and item must
    have factors. All item factors are collected to the driver and broadcast: callers bound their size
    (see :data:`OBJECTIVE_MAX_ITEM_BYTES`).
    """
    level = StorageLevel.MEMORY_AND_DISK
    rank = len(item_factors.first()["features"])
    blocks = build_rating_blocks(ratings, num_blocks, num_blocks, level)
    user_in, item_in = blocks.user_in, blocks.item_in
    users = factor_frame_to_blocks(user_factors, num_blocks, rank, blocks.user_partitions)
    items = factor_frame_to_blocks(item_factors, num_blocks, rank, blocks.item_partitions)
    item_blocks = sorted(items.collect(), key=lambda kv: kv[0])
    item_gramian = sum((solve.gramian(fb.factors) for _, fb in item_blocks), np.zeros((rank, rank)))
    n_items = sum(fb.ids.shape[0] for _, fb in item_blocks)
    n_users = users.map(lambda kv: kv[1].ids.shape[0]).sum()
    lookup = spark.sparkContext.broadcast(_fixed_side_lookup(item_blocks))

    def user_terms(records):
        sorted_ids, table = lookup.value
        for block_id, parts in _blocks_of_partition(records):
            in_block, known = parts.in_block, parts.factors
            if in_block is None:
                continue
            rows = in_block.src_ids if sorted_ids is None else np.searchsorted(sorted_ids, in_block.src_ids)
            x = known.factors[np.searchsorted(known.ids, in_block.dst_ids)]
            with task_blas_threads():
                yield block_id, sum(solve.block_loss(in_block.indptr, in_block.indices, in_block.ratings, x,
                                                     table[rows], item_gramian, n_items, params))

    def item_terms(records):
        for block_id, parts in _blocks_of_partition(records):
            in_block, known = parts.in_block, parts.factors
            if in_block is None:
                continue
            y = known.factors[np.searchsorted(known.ids, in_block.dst_ids)]
            yield block_id, solve.regularization_loss(in_block.n_positive, y, n_users, params)

    # Added in block order, as training adds its losses: collect order follows the task partitions,
    # which pack blocks differently with the core count (local[2] against local[8]).
    by_block = sorted(user_in.union(users).mapPartitions(user_terms).collect())
    total = sum(value for _, value in by_block)
    total += sum(value for _, value in sorted(item_in.union(items).mapPartitions(item_terms).collect()))
    lookup.destroy()  # both sums are collected: nothing reads it again (unpersist left its driver file)
    blocks.unpersist()
    return float(total)
