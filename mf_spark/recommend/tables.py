"""The published recommendation tables: string ids joined back, and the recommend stage of a run.

``recommendations``: ``user_id`` string, ``rank`` int (1..N), ``item_id`` string, ``score`` float.
``similar_items``: ``item_id`` string, ``rank`` int, ``similar_item_id`` string, ``score`` float (cosine).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mf_spark import publish
from mf_spark.als.params import SolveParams
from mf_spark.errors import InputDataError
from mf_spark.recommend.engine import DEFAULT_MAX_BROADCAST_BYTES, has_nonzero_factor, recommend_top_k, similar_items
from mf_spark.recommend.fold_in import fold_in_new_users
from mf_spark.tables import INTERACTION_COLUMNS, read_parquet_table, require_columns

logger = logging.getLogger(__name__)


def to_string_ids(recs: DataFrame, dim_user: DataFrame, dim_item: DataFrame) -> DataFrame:
    """Recommendations with the original ids.

    Parameters
    ----------
    recs : DataFrame
        ``src`` int (user_idx), ``rank`` int, ``dst`` int (item_idx), ``score`` float.
    dim_user : DataFrame
        ``user_id`` string, ``user_idx`` int.
    dim_item : DataFrame
        ``item_id`` string, ``item_idx`` int.

    Returns
    -------
    DataFrame
        ``user_id`` string, ``rank`` int, ``item_id`` string, ``score`` float. Rows whose index is
        missing from a map are dropped (inner joins).
    """
    require_columns(dim_user, "dim_user", ("user_id", "user_idx"))
    require_columns(dim_item, "dim_item", ("item_id", "item_idx"))
    users = dim_user.select(F.col("user_idx").cast("int").alias("src"), F.col("user_id").cast("string"))
    items = dim_item.select(F.col("item_idx").cast("int").alias("dst"), F.col("item_id").cast("string"))
    return recs.join(users, "src").join(items, "dst").select("user_id", "rank", "item_id", "score")


def similar_to_string_ids(sims: DataFrame, dim_item: DataFrame) -> DataFrame:
    """Similar items with the original ids: ``item_id``, ``rank``, ``similar_item_id``, ``score``.

    ``sims`` has the columns of :func:`~mf_spark.recommend.engine.similar_items`.
    """
    require_columns(dim_item, "dim_item", ("item_id", "item_idx"))
    items = dim_item.select(F.col("item_idx").cast("int").alias("idx"), F.col("item_id").cast("string"))
    return (
        sims.join(items.withColumnRenamed("idx", "item"), "item")
        .join(
            items.select(F.col("idx").alias("similar_item"), F.col("item_id").alias("similar_item_id")),
            "similar_item",
        )
        .select("item_id", "rank", "similar_item_id", "score")
    )


def item_ids_to_index(items: DataFrame, dim_item: DataFrame, name: str) -> DataFrame:
    """``id`` int of the ``item_id`` values of a filter table (ids unknown to ``dim_item`` are ignored)."""
    require_columns(items, name, ("item_id",))
    return (
        items.select(F.col("item_id").cast("string"))
        .join(dim_item.select(F.col("item_id").cast("string"), F.col("item_idx")), "item_id")
        .select(F.col("item_idx").cast("int").alias("id"))
        .distinct()
    )


@dataclass(frozen=True)
class RecommendSettings:
    """Plain values of the ``[recommend]`` config section (and the training settings fold-in needs)."""

    top_n: int = 100
    similar_n: int = 20
    exclude_seen: bool = True
    fold_in_new_users: bool = True
    user_block_size: int = 4096
    item_chunk_size: int = 50000
    max_broadcast_bytes: int = DEFAULT_MAX_BROADCAST_BYTES
    solve_params: SolveParams = field(default_factory=SolveParams)


@dataclass
class RecommendationTables:
    """Outputs of :func:`build_recommendation_tables` (lazy DataFrames)."""

    recommendations: DataFrame
    similar_items: DataFrame
    folded_users: DataFrame | None
    broadcasts: list[Broadcast] = field(default_factory=list)

    def release(self) -> None:
        """Free the folded-in users' cache and destroy the scoring broadcasts, once both tables are written.

        Every broadcast keeps a driver temp file until it is destroyed; in a backfill's session they
        piled up, one dst matrix per table per date.
        """
        if self.folded_users is not None:
            self.folded_users.unpersist()
        for broadcast in self.broadcasts:
            broadcast.destroy()
        self.broadcasts = []


def build_recommendation_tables(
    user_factors: DataFrame,
    item_factors: DataFrame,
    interactions: DataFrame,
    dim_user: DataFrame,
    dim_item: DataFrame,
    settings: RecommendSettings,
    *,
    item_filter: DataFrame | None = None,
    allow_list: DataFrame | None = None,
) -> RecommendationTables:
    """Top-N per user (seen excluded, new users folded in) and similar items, with string ids.

    Only users with at least one positive ``strength`` in ``interactions`` get a list (a user with only
    negative interactions has a zero factor and nothing to rank by).

    Parameters
    ----------
    user_factors, item_factors : DataFrame
        ``id`` int, ``features`` array<float>.
    interactions : DataFrame
        ``user_idx`` int, ``item_idx`` int, ``strength`` float: the training window.
    dim_user, dim_item : DataFrame
        ``user_id``/``user_idx`` and ``item_id``/``item_idx``.
    settings : RecommendSettings
    item_filter, allow_list : DataFrame, optional
        ``item_id`` string: items removed for everyone / the only items recommended.
    """
    users = user_factors.select("id", "features")
    folded = None
    if settings.fold_in_new_users:
        _, folded = fold_in_new_users(
            users, item_factors, interactions, settings.solve_params, block_size=settings.user_block_size
        )
        # The user table is read more than once (sizes, then scoring): solve the new users only once.
        folded = folded.persist()
        users = user_factors.select("id", "features").unionByName(folded)
    # A user whose interactions are all negative (only returns) has no positive evidence: ALS gives them
    # a zero factor, so their "top N" would be items ranked by ties at score 0. They get no list; the
    # serving side falls back (e.g. to popular items) as for any user without one.
    # The same for a user with a positive interaction but a zero factor: a model scored against newer
    # interactions (--model), or a new user whose positive items have no factor (fold-in solves zero).
    positive_users = interactions.where(F.col("strength") > 0).select(F.col("user_idx").alias("id")).distinct()
    users = users.join(positive_users, "id", "left_semi").where(has_nonzero_factor())
    exclude = None if item_filter is None else item_ids_to_index(item_filter, dim_item, "item filter")
    allow = None if allow_list is None else item_ids_to_index(allow_list, dim_item, "allow list")
    _check_candidates_left(item_factors, exclude, allow_list, allow)
    broadcasts: list[Broadcast] = []
    recs = recommend_top_k(
        users, item_factors, settings.top_n,
        seen=interactions if settings.exclude_seen else None,
        exclude_dst=exclude, allow_dst=allow,
        src_block_size=settings.user_block_size, dst_chunk_size=settings.item_chunk_size,
        max_broadcast_bytes=settings.max_broadcast_bytes, broadcasts=broadcasts,
    )
    sims = similar_items(
        item_factors, settings.similar_n, src_block_size=settings.user_block_size,
        dst_chunk_size=settings.item_chunk_size, max_broadcast_bytes=settings.max_broadcast_bytes,
        exclude_dst=exclude, allow_dst=allow, broadcasts=broadcasts,
    )
    return RecommendationTables(
        to_string_ids(recs, dim_user, dim_item), similar_to_string_ids(sims, dim_item), folded, broadcasts
    )


def _check_candidates_left(
    item_factors: DataFrame, exclude: DataFrame | None, allow_list: DataFrame | None, allow: DataFrame | None
) -> None:
    """Refuse filters that leave no item to recommend: every list would be empty, and nothing downstream
    (the gate evaluates the model, not the published tables) would stop them being published."""
    if allow is None and exclude is None:
        return
    if allow is not None:
        listed = allow_list.select(F.col("item_id").cast("string")).distinct().count()
        known = allow.count()
        if known == 0:
            sample = [r.item_id for r in allow_list.select(F.col("item_id").cast("string")).limit(3).collect()]
            raise InputDataError(
                f"allow list (recommend.allow_list_path): none of its {listed} item ids is a known item "
                f"(e.g. {sample}); check that they are the item ids of the events (a double column writes "
                "85123 as '85123.0')"
            )
        if known < listed:
            logger.warning("allow list: %d of its %d item ids are unknown items and are ignored",
                           listed - known, listed)
    candidates = item_factors.select(F.col("id").cast("int").alias("id"))
    if allow is not None:
        candidates = candidates.join(allow, "id", "left_semi")
    if exclude is not None:
        candidates = candidates.join(exclude, "id", "left_anti")
    if candidates.limit(1).count() == 0:
        raise InputDataError("the item filter and the allow list leave no item with factors to recommend")


def check_id_map_matches(factors: DataFrame, dim: DataFrame, side: str, factors_path: str) -> None:
    """Refuse an ID map that gives the factors' indices other ids than the ones written beside them.

    The nightly writes each factor row with its string id (``user_id``/``item_id``). A recommend job
    pointed at a run from another output root (a copy of production) took this root's map and joined
    one root's indices to the other's ids without a word. Factor tables without the id column (a model
    saved by ``jobs/train.py``) cannot be checked.
    """
    id_col, idx_col = f"{side}_id", f"{side}_idx"
    if id_col not in factors.columns:
        return
    in_map = dim.select(F.col(idx_col).cast("int").alias("id"), F.col(id_col).cast("string").alias("map_id"))
    wrong = (
        factors.select(F.col("id").cast("int").alias("id"), F.col(id_col).cast("string").alias("written_id"))
        .join(in_map, "id", "left")
        .where(~F.col("written_id").eqNullSafe(F.col("map_id")))
    )
    examples = wrong.orderBy("id").limit(3).collect()
    if examples:
        shown = ", ".join(f"index {r.id} is {r.written_id!r} there but {r.map_id!r} in the map" for r in examples)
        raise InputDataError(
            f"recommend: the {side} ID map does not match the {side} factors in {factors_path} ({shown}); "
            "the run comes from another output root: run the job with that root's output.root, whose "
            "id_maps/ numbered these factors"
        )


def _read_table(spark: SparkSession, path: str, what: str, required: tuple[str, ...] = ()) -> DataFrame:
    return read_parquet_table(spark, path, f"recommend: {what}", required)


def read_item_table(spark: SparkSession, path: str, key: str) -> DataFrame | None:
    """The ``item_id`` table of config key ``recommend.<key>`` (item filter or allow list), or None when
    the key is empty. The nightly and the recommend job both read them here."""
    if not path:
        return None
    return read_parquet_table(spark, path, f"recommend.{key} =", ("item_id",))


def _read_id_map(spark: SparkSession, run_dir: str, id_map_dir: str | None, name: str) -> DataFrame:
    """``run_dir/<name>`` when the run carries its own map, else the *current* version of the
    versioned map under ``id_map_dir`` (following its pointer: the directory holds older versions too)."""
    from mf_spark.ingest.id_maps import load_id_map, read_pointer

    local = os.path.join(run_dir, name)
    if os.path.exists(local):
        return spark.read.parquet(local)
    if id_map_dir and read_pointer(id_map_dir) is not None:
        return load_id_map(spark, id_map_dir, name)
    raise InputDataError(f"recommend: id map {name} not found in {local}"
                         + (f" nor under {id_map_dir} (no CURRENT.json)" if id_map_dir else ""))


def write_tables_replacing(tables: dict[str, DataFrame]) -> None:
    """Write each ``path -> df`` as Parquet so that a reader finds the old complete tables or the new ones.

    ``mode("overwrite")`` deletes the old table before computing the new one, so a failure or a kill
    during the write would leave the run - possibly the published one - without the table. Instead every
    table is written to a hidden temporary directory beside its path, and only once all writes succeeded
    are they swapped in (:func:`mf_spark.publish.replace_dir`), one after the other: a failure while
    computing the second no longer leaves the first new beside the second old, from two models. The
    temporaries are removed on failure.
    """
    with contextlib.ExitStack() as swaps:  # on a clean exit the staged tables are swapped in, last first
        for path, df in tables.items():
            df.write.parquet(str(swaps.enter_context(publish.staged_dir(path))))


def run_recommend_stage(
    spark: SparkSession,
    run_dir: str,
    settings: RecommendSettings,
    *,
    id_map_dir: str | None = None,
    item_filter_path: str = "",
    allow_list_path: str = "",
    model_dir: str | None = None,
    interactions_path: str | None = None,
) -> dict[str, int]:
    """Read a run's factors, interactions and id maps, write ``recommendations`` and ``similar_items``.

    Id maps are read from ``run_dir/dim_user`` and ``run_dir/dim_item``, else from ``id_map_dir``.
    ``run_dir`` may be a published run that consumers are reading: each table is replaced with
    :func:`write_tables_replacing`, so a failed or killed job leaves the previous tables in place.

    ``model_dir`` (a model saved by :class:`~mf_spark.als.model.ImplicitALSModel`, e.g. by
    ``jobs/train.py``: ``userFactors/``, ``itemFactors/``) and ``interactions_path`` replace the run's
    ``user_factors``/``item_factors`` and ``interactions``; ``run_dir`` then only receives the tables.

    Returns
    -------
    dict
        Row counts: ``recommendations``, ``similar_items``, ``folded_in_users``.
    """
    if model_dir:
        user_path, item_path = os.path.join(model_dir, "userFactors"), os.path.join(model_dir, "itemFactors")
    else:
        user_path, item_path = os.path.join(run_dir, "user_factors"), os.path.join(run_dir, "item_factors")
    user_factors = _read_table(spark, user_path, "user factors")
    item_factors = _read_table(spark, item_path, "item factors")
    # checked here: a table without them (a rejects table) failed in fold-in with an analysis trace
    interactions = _read_table(spark, interactions_path or os.path.join(run_dir, "interactions"), "interactions",
                               INTERACTION_COLUMNS)
    maps = {name: _read_id_map(spark, run_dir, id_map_dir, name) for name in ("dim_user", "dim_item")}
    for factors, path, side in ((user_factors, user_path, "user"), (item_factors, item_path, "item")):
        check_id_map_matches(factors, maps[f"dim_{side}"], side, path)
    item_filter = read_item_table(spark, item_filter_path, "item_filter_path")
    allow_list = read_item_table(spark, allow_list_path, "allow_list_path")
    tables = build_recommendation_tables(
        user_factors.select("id", "features"), item_factors.select("id", "features"), interactions,
        maps["dim_user"], maps["dim_item"], settings, item_filter=item_filter, allow_list=allow_list,
    )
    outputs = {"recommendations": tables.recommendations, "similar_items": tables.similar_items}
    write_tables_replacing({os.path.join(run_dir, name): df for name, df in outputs.items()})
    counts = {name: spark.read.parquet(os.path.join(run_dir, name)).count() for name in outputs}
    counts["folded_in_users"] = 0 if tables.folded_users is None else tables.folded_users.count()
    tables.release()
    logger.info("recommend: wrote %s", counts)
    return counts
