"""The nightly end to end in local mode: the output contract, the manifest and a warm-started second day."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.config import load_config
from mf_spark.pipeline import run_nightly

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "ingest.lookback_days=10", "train.rank=8", "train.max_iter=4", "train.warm_start_iterations=2",
    "train.num_user_blocks=2", "train.num_item_blocks=2", "recommend.top_n=10", "recommend.similar_n=5",
    "evaluate.ks=[10, 20]", "evaluate.gate.min_value=0.0",
]


@pytest.fixture(scope="module")
def filtered_items(spark, tmp_path_factory) -> tuple[Path, list[str]]:
    """An item filter of the three most bought items of both days' windows (so they have factors and
    would be neighbours of many items if the filter were ignored)."""
    events = spark.read.parquet(str(REPO / "data" / "sample" / "events"))
    top = (events.where(F.col("event_date") >= "2011-11-28").groupBy("item_id").count()
           .orderBy(F.desc("count"), "item_id").limit(3).collect())
    items = [r.item_id for r in top]
    path = tmp_path_factory.mktemp("item-filter") / "filter"
    spark.createDataFrame([(i,) for i in items], "item_id string").write.parquet(str(path))
    return path, items


@pytest.fixture(scope="module")
def two_days(spark, tmp_path_factory, filtered_items):
    root = tmp_path_factory.mktemp("nightly-root")
    cfg = load_config(REPO / "conf" / "local.toml",
                      [*SMALL, f"output.root={root}", f"recommend.item_filter_path={filtered_items[0]}"])
    first = run_nightly(spark, cfg, dt.date(2011, 12, 8), print_summary=False)
    second = run_nightly(spark, cfg, dt.date(2011, 12, 9), print_summary=True)
    return root, first, second


def schema_of(spark, path: str) -> dict[str, str]:
    return {f.name: f.dataType.simpleString() for f in spark.read.parquet(path).schema.fields}


def test_outputs_follow_the_contract(spark, two_days):
    root, _, second = two_days
    run = Path(second.run_dir)
    assert schema_of(spark, str(run / "recommendations")) == {
        "user_id": "string", "rank": "int", "item_id": "string", "score": "float"}
    assert schema_of(spark, str(run / "similar_items")) == {
        "item_id": "string", "rank": "int", "similar_item_id": "string", "score": "float"}
    assert schema_of(spark, str(run / "user_factors")) == {"id": "int", "user_id": "string", "features": "array<float>"}
    assert schema_of(spark, str(run / "item_factors")) == {"id": "int", "item_id": "string", "features": "array<float>"}
    interactions = schema_of(spark, str(run / "interactions"))
    assert {k: interactions[k] for k in ("user_idx", "item_idx", "strength")} == {
        "user_idx": "int", "item_idx": "int", "strength": "float"}
    assert (run / "evaluation" / "metrics.json").exists()
    assert list((run / "evaluation").glob("*.png"))

    recs = spark.read.parquet(str(run / "recommendations"))
    assert recs.where(F.col("user_id").isNull() | F.col("item_id").isNull() | F.isnan("score")).count() == 0
    per_user = recs.groupBy("user_id").agg(F.count("*").alias("n"), F.min("rank").alias("lo"),
                                            F.max("rank").alias("hi"), F.countDistinct("rank").alias("d"))
    assert per_user.where((F.col("lo") != 1) | (F.col("hi") != F.col("n")) | (F.col("d") != F.col("n"))).count() == 0
    assert per_user.agg(F.max("n")).first()[0] == 10
    # seen items are excluded
    inter = spark.read.parquet(str(run / "interactions"))
    users = spark.read.parquet(str(run / "user_factors")).select(F.col("id").alias("user_idx"), "user_id")
    items = spark.read.parquet(str(run / "item_factors")).select(F.col("id").alias("item_idx"), "item_id")
    seen = inter.join(users, "user_idx").join(items, "item_idx").select("user_id", "item_id")
    assert recs.join(seen, ["user_id", "item_id"], "inner").count() == 0
    sims = spark.read.parquet(str(run / "similar_items"))
    assert sims.where(F.col("item_id") == F.col("similar_item_id")).count() == 0


def test_filtered_items_are_never_recommended_nor_anyones_similar_item(spark, two_days, filtered_items):
    """The nightly builds its tables as jobs/recommend.py does (docs/recommend.md: filtered items are
    never recommended and keep their own similar-items list); it once left them in similar_items."""
    _, _, second = two_days
    run, items = Path(second.run_dir), filtered_items[1]
    item_factors = spark.read.parquet(str(run / "item_factors"))
    assert item_factors.where(F.col("item_id").isin(items)).count() == len(items)  # the filter bites
    recs = spark.read.parquet(str(run / "recommendations"))
    sims = spark.read.parquet(str(run / "similar_items"))
    assert recs.where(F.col("item_id").isin(items)).count() == 0
    assert sims.where(F.col("similar_item_id").isin(items)).count() == 0
    assert sims.where(F.col("item_id").isin(items)).select("item_id").distinct().count() == len(items)


def test_recommend_settings_follow_the_config():
    """broadcast_max_mb and fold_in_new_users reach the nightly's recommend stage (it ignored both)."""
    from mf_spark.pipeline import recommend_settings_from

    cfg = load_config(REPO / "conf" / "local.toml", [
        "recommend.broadcast_max_mb=3", "recommend.fold_in_new_users=false", "recommend.top_n=7",
        "recommend.user_block_size=16", "train.alpha=2.5"])
    settings = recommend_settings_from(cfg)
    assert settings.max_broadcast_bytes == 3 * 2**20
    assert settings.fold_in_new_users is False
    assert (settings.top_n, settings.user_block_size, settings.solve_params.alpha) == (7, 16, 2.5)
    assert settings.solve_params.solver == "cholesky"  # fold-in always solves exactly


def test_manifest_and_latest(two_days):
    root, first, second = two_days
    latest = json.loads((Path(root) / "latest.json").read_text())
    assert latest["run_id"] == second.manifest["run"]["run_id"]
    manifest = json.loads((Path(second.run_dir) / "manifest.json").read_text())
    assert manifest["status"] == "published"
    for key in ("ingest", "train", "metrics", "outputs", "id_maps", "timings", "parameters"):
        assert key in manifest, key
    assert manifest["ingest"]["rows_read"] == (manifest["ingest"]["accepted_events"] + manifest["ingest"]["rejected"]
                                               + manifest["ingest"]["deduplicated"])
    assert set(manifest["timings"]) >= {"ingest", "train", "recommend", "evaluate"}  # publish ends after the manifest is written
    assert manifest["outputs"]["recommendations"] > 0
    # day two was warm-started from day one, with fewer iterations
    assert manifest["train"]["warm_start_from"] == first.manifest["run"]["run_id"]
    assert len(manifest["train"]["training_loss"]) == 2
    assert first.manifest["train"]["warm_start_from"] is None

