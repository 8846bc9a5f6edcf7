"""Top-N, similar items, fold-in and the published tables, against brute-force numpy on tiny data."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from mf_spark.als.params import SolveParams
from mf_spark.errors import InputDataError
from mf_spark.recommend import (
    fold_in_factors,
    fold_in_new_users,
    recommend_top_k,
    similar_items,
    similar_to_string_ids,
    to_string_ids,
)

BROADCAST, CROSS = 1 << 30, 0  # max_broadcast_bytes forcing each plan
PLANS = pytest.mark.parametrize("max_broadcast_bytes", [BROADCAST, CROSS], ids=["broadcast", "cross"])


def factor_frame(spark, ids, matrix):
    return spark.createDataFrame(
        [(int(i), [float(x) for x in row]) for i, row in zip(ids, matrix)], "id int, features array<float>"
    )


def brute_force(src_ids, src, dst_ids, dst, k, masked=frozenset(), cosine=False):
    """Rows (src, rank, dst, score): every pair scored in float32, full sort by (-score, dst id)."""
    if cosine:
        src = src / np.maximum(np.linalg.norm(src, axis=1, keepdims=True), 1e-30)
        dst = dst / np.maximum(np.linalg.norm(dst, axis=1, keepdims=True), 1e-30)
    scores = src.astype(np.float32) @ dst.astype(np.float32).T
    rows = []
    for r, s in enumerate(src_ids):
        cands = sorted(
            (-float(scores[r, c]), int(d)) for c, d in enumerate(dst_ids) if (int(s), int(d)) not in masked
        )
        rows += [(int(s), rank, d, -neg) for rank, (neg, d) in enumerate(cands[:k], start=1)]
    return sorted(rows)


def collected(df, cols=("src", "rank", "dst", "score")):
    return sorted(tuple(r) for r in df.select(*cols).collect())


def assert_same(got, expected):
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    np.testing.assert_allclose([g[3] for g in got], [e[3] for e in expected], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(11)
    n_users, n_items, rank = 37, 29, 4
    user_ids = np.arange(n_users) * 3 + 1  # sparse ids
    item_ids = np.arange(n_items) * 2
    users = rng.normal(size=(n_users, rank)).astype(np.float32)
    items = rng.normal(size=(n_items, rank)).astype(np.float32)
    seen = sorted({(int(u), int(i)) for u in user_ids for i in rng.choice(item_ids, rng.integers(0, 9))})
    return {
        "user_ids": user_ids, "item_ids": item_ids, "users": users, "items": items, "seen": seen,
        "user_df": factor_frame(spark, user_ids, users), "item_df": factor_frame(spark, item_ids, items),
        "seen_df": spark.createDataFrame(
            [(u, i, 1.0) for u, i in seen], "user_idx int, item_idx int, strength float"
        ),
    }


@PLANS
@pytest.mark.parametrize("sizes", [(4096, 50000), (5, 4)], ids=["one-block", "many-blocks-and-chunks"])
def test_top_k_equals_brute_force_with_seen_excluded(data, max_broadcast_bytes, sizes):
    recs = recommend_top_k(data["user_df"], data["item_df"], 6, seen=data["seen_df"], src_block_size=sizes[0],
                           dst_chunk_size=sizes[1], max_broadcast_bytes=max_broadcast_bytes)
    assert recs.schema.simpleString() == "struct<src:int,rank:int,dst:int,score:float>"
    expected = brute_force(data["user_ids"], data["users"], data["item_ids"], data["items"], 6,
                           set(data["seen"]))
    assert_same(collected(recs), expected)


def test_the_cross_plan_runs_no_more_tasks_than_there_are_user_blocks(spark, data):
    """The crossing ran one task per pair of partitions of the packed blocks and chunks: 12,000 blocks x
    100 chunk partitions would be 1.2M tasks in one stage for the driver to track. Here 37 blocks x 29
    chunks made 1,073; packing the blocks takes 37."""
    sc = spark.sparkContext
    # as with a large catalogue: the chunks too big to broadcast into the join, nor coalesced by AQE
    settings = {"spark.sql.adaptive.coalescePartitions.enabled": "false", "spark.sql.autoBroadcastJoinThreshold": "-1"}
    previous = {key: spark.conf.get(key) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    sc.setJobGroup("cross-plan-tasks", "count the tasks of the cross plan")
    try:
        recs = recommend_top_k(data["user_df"], data["item_df"], 6, seen=data["seen_df"], src_block_size=1,
                               dst_chunk_size=1, max_broadcast_bytes=CROSS)
        assert_same(collected(recs), brute_force(data["user_ids"], data["users"], data["item_ids"],
                                                 data["items"], 6, set(data["seen"])))
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        for key, value in previous.items():
            spark.conf.set(key, value)
    tracker = sc.statusTracker()
    tasks = [tracker.getStageInfo(stage).numTasks for job in tracker.getJobIdsForGroup("cross-plan-tasks")
             for stage in tracker.getJobInfo(job).stageIds if tracker.getStageInfo(stage) is not None]
    assert max(tasks) == len(data["user_ids"]), sorted(tasks)


@PLANS
def test_top_k_without_seen_exclusion(data, max_broadcast_bytes):
    recs = recommend_top_k(data["user_df"], data["item_df"], 3, src_block_size=8, dst_chunk_size=10,
                           max_broadcast_bytes=max_broadcast_bytes)
    expected = brute_force(data["user_ids"], data["users"], data["item_ids"], data["items"], 3)
    assert_same(collected(recs), expected)


@PLANS
def test_exclude_and_allow_lists(spark, data, max_broadcast_bytes):
    allow = [int(i) for i in data["item_ids"][::2]]
    exclude = allow[:4] + [int(data["item_ids"][1])]
    recs = recommend_top_k(
        data["user_df"], data["item_df"], 5, seen=data["seen_df"],
        allow_dst=spark.createDataFrame([(i,) for i in allow], "id int"),
        exclude_dst=spark.createDataFrame([(i,) for i in exclude], "id int"),
        src_block_size=10, dst_chunk_size=3, max_broadcast_bytes=max_broadcast_bytes,
    )
    keep = np.isin(data["item_ids"], allow) & ~np.isin(data["item_ids"], exclude)
    expected = brute_force(data["user_ids"], data["users"], data["item_ids"][keep], data["items"][keep], 5,
                           set(data["seen"]))
    assert_same(collected(recs), expected)


@PLANS
def test_k_larger_than_the_catalogue_and_users_with_few_candidates(spark, data, max_broadcast_bytes):
    items = data["item_ids"][:6]
    item_df = factor_frame(spark, items, data["items"][:6])
    first, second = int(data["user_ids"][0]), int(data["user_ids"][1])
    seen = [(first, int(i)) for i in items[:5]] + [(second, int(i)) for i in items]
    seen_df = spark.createDataFrame(seen, "user_idx int, item_idx int")
    recs = recommend_top_k(data["user_df"], item_df, 50, seen=seen_df, src_block_size=6, dst_chunk_size=2,
                           max_broadcast_bytes=max_broadcast_bytes)
    got = collected(recs)
    assert_same(got, brute_force(data["user_ids"], data["users"], items, data["items"][:6], 50, set(seen)))
    per_user = {}
    for src, *_ in got:
        per_user[src] = per_user.get(src, 0) + 1
    assert per_user[int(data["user_ids"][0])] == 1 and int(data["user_ids"][1]) not in per_user
    assert per_user[int(data["user_ids"][2])] == 6


@PLANS
def test_ties_break_by_lower_item_id_and_reruns_are_identical(spark, max_broadcast_bytes):
    rng = np.random.default_rng(2)
    users = rng.integers(-1, 2, size=(25, 3)).astype(np.float32)
    items = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    user_df, item_df = factor_frame(spark, range(25), users), factor_frame(spark, range(40), items)
    runs = [
        collected(recommend_top_k(user_df, item_df, 8, src_block_size=4, dst_chunk_size=7,
                                  max_broadcast_bytes=max_broadcast_bytes))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] == brute_force(np.arange(25), users, np.arange(40), items, 8)  # integer scores: exact


@PLANS
def test_similar_items_are_cosine_neighbours_without_the_item_itself(data, max_broadcast_bytes):
    sims = similar_items(data["item_df"], 4, src_block_size=7, dst_chunk_size=5,
                         max_broadcast_bytes=max_broadcast_bytes)
    assert sims.columns == ["item", "rank", "similar_item", "score"]
    self_pairs = {(int(i), int(i)) for i in data["item_ids"]}
    expected = brute_force(data["item_ids"], data["items"], data["item_ids"], data["items"], 4, self_pairs,
                           cosine=True)
    assert_same(collected(sims, ("item", "rank", "similar_item", "score")), expected)


def test_bad_inputs_name_the_column(spark, data):
    with pytest.raises(InputDataError, match="'features'"):
        recommend_top_k(data["user_df"].select("id"), data["item_df"], 3)
    with pytest.raises(InputDataError, match="'item_idx'"):
        recommend_top_k(data["user_df"], data["item_df"], 3, seen=data["seen_df"].drop("item_idx"))
    short = factor_frame(spark, [1], [[1.0, 2.0]])
    with pytest.raises(InputDataError, match="rank 2"):
        recommend_top_k(short, data["item_df"], 3)
    ragged = spark.createDataFrame([(1, [1.0]), (2, [1.0, 2.0])], "id int, features array<float>")
    with pytest.raises(InputDataError, match="one length"):
        recommend_top_k(ragged, data["item_df"], 3)
    with pytest.raises(InputDataError, match="dst_factors: column 'id' has 1 duplicate"):
        recommend_top_k(data["user_df"], data["item_df"].union(data["item_df"].limit(1)), 3)
    # size(NULL) is NULL under ANSI mode: these passed the checks and failed inside a Python worker
    for features in (None, [1.0, None]):
        holed = spark.createDataFrame([(1, [1.0, 2.0]), (2, features)], "id int, features array<float>")
        with pytest.raises(InputDataError, match="src_factors: 1 rows have a null 'features' vector"):
            recommend_top_k(holed, data["item_df"], 3)
        with pytest.raises(InputDataError, match="1 rows have a null 'features' vector"):
            similar_items(holed, 1)


def test_empty_sides_give_an_empty_table(spark, data):
    assert recommend_top_k(data["user_df"].limit(0), data["item_df"], 3).count() == 0


# ---------------------------------------------------------------------------------------------
# fold-in


def dense_fold_in(history, items_by_id, params: SolveParams):
    """Closed form of HKV eq. 4 for one user: x = (YtY + Y^T (C - I) Y + lambda I)^-1 Y^T C p."""
    Y = np.array(list(items_by_id.values()), dtype=np.float64)
    gram = Y.T @ Y
    rank = Y.shape[1]
    rated = np.array([items_by_id[i] for i in history], dtype=np.float64)
    r = np.array(list(history.values()), dtype=np.float64)
    if params.confidence == "linear":
        extra = params.alpha * np.abs(r)
    else:
        extra = params.alpha * np.log1p(np.abs(r) / params.confidence_epsilon)
    positive = r > 0
    lam = {
        "count": params.reg_param * positive.sum(),
        "constant": params.reg_param,
        "frequency": params.reg_param * (positive.sum() + params.frequency_alpha0 * len(Y))
        ** params.frequency_nu,
    }[params.regularization]
    A = gram + rated.T @ (extra[:, None] * rated) + lam * np.eye(rank)
    b = rated[positive].T @ (1.0 + extra[positive])
    return np.linalg.solve(A, b)


@pytest.mark.parametrize("chunk_ids", [1 << 16, 16])
def test_factor_gramian_does_not_depend_on_partitioning(spark, monkeypatch, chunk_ids):
    """Per-Arrow-batch partials added in collect order changed the fold-in Gramian's last bits with the
    number of partitions (found with 1, 3 and 7 of the same 3000 x 16 factors)."""
    from mf_spark.recommend import fold_in as fold_in_module

    monkeypatch.setattr(fold_in_module, "GRAMIAN_CHUNK_IDS", chunk_ids)
    rng = np.random.default_rng(12)
    ids = rng.permutation(3000)[:600]
    matrix = rng.normal(size=(600, 16)).astype(np.float32) * rng.lognormal(size=(600, 1)).astype(np.float32)
    table = factor_frame(spark, ids, matrix)
    grams = [fold_in_module.factor_gramian(table.repartition(n)) for n in (1, 3, 7)]
    for gram, n in grams[1:]:
        assert np.array_equal(gram, grams[0][0]) and n == 600
    m64 = matrix.astype(np.float64)
    np.testing.assert_allclose(grams[0][0], m64.T @ m64, rtol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        SolveParams(alpha=5.0, reg_param=0.1),
        SolveParams(alpha=2.0, reg_param=0.3, regularization="constant", confidence="log"),
        SolveParams(alpha=1.0, reg_param=0.05, regularization="frequency", frequency_alpha0=0.2,
                    frequency_nu=0.5, solver="cg"),
    ],
    ids=["count-linear", "constant-log", "frequency-cg-params-still-exact"],
)
def test_fold_in_equals_the_dense_closed_form(spark, params):
    rng = np.random.default_rng(4)
    item_ids = np.arange(15) + 100
    items = rng.normal(size=(15, 3)).astype(np.float32)
    rows = []
    for user in range(9):
        for item in rng.choice(item_ids, rng.integers(1, 8), replace=False):
            rows.append((user, int(item), float(rng.choice([-1.0, 1.0, 2.5, 4.0]))))
    rows.append((0, int(rows[0][1]), 1.5))  # a duplicate pair: summed, as training does
    rows.append((3, 999, 1.0))  # an item without factors: ignored
    interactions = spark.createDataFrame(rows, "user_idx int, item_idx int, strength float")
    folded = fold_in_factors(interactions, factor_frame(spark, item_ids, items), params, block_size=4)
    solved = {r.id: np.array(r.features) for r in folded.collect()}
    assert sorted(solved) == list(range(9))
    items_by_id = {int(i): items[n] for n, i in enumerate(item_ids)}
    for user in range(9):
        history: dict[int, float] = {}
        for u, i, s in rows:
            if u == user and i in items_by_id:
                history[i] = history.get(i, 0.0) + s
        expected = dense_fold_in(history, items_by_id, params)
        np.testing.assert_allclose(solved[user], expected, rtol=1e-4, atol=1e-5)


def test_fold_in_sums_duplicates_in_value_order_as_training(spark):
    """Duplicates were summed in arrival order: 1e16 + 1 - 1e16 is 0 one way and 1 the other, so the
    same rows in another order folded in another factor."""
    rng = np.random.default_rng(0)
    items = factor_frame(spark, range(8), rng.normal(size=(8, 4)))
    rows = [(100, 3, 1e16), (100, 3, -1e16), (100, 3, 1.0), (100, 5, 2.0), (100, 7, 1.0)]
    orders = [rows, [rows[0], rows[2], rows[1], *rows[3:]], rows[::-1]]
    params = SolveParams(alpha=1.0, reg_param=0.1, solver="cholesky")
    folded = [fold_in_factors(spark.createDataFrame(r, "user_idx int, item_idx int, strength double").coalesce(1),
                              items, params).collect()[0]["features"] for r in orders]
    assert folded[0] == folded[1] == folded[2]
    # training's sum of the same values: ascending, -1e16 + 1 + 1e16 = 0.0
    single = [(100, 3, 0.0), (100, 5, 2.0), (100, 7, 1.0)]
    expected = fold_in_factors(spark.createDataFrame(single, "user_idx int, item_idx int, strength double"),
                               items, params).collect()[0]["features"]
    assert folded[0] == expected


@pytest.mark.parametrize("strengths", [[float("nan")], [float("inf")], [3e38, 3e38]], ids=["nan", "inf", "sum"])
def test_fold_in_refuses_strengths_training_would_refuse(spark, strengths):
    """Training refuses NaN, infinite and float32-overflowing strengths; fold-in solved an all-NaN factor,
    so the user silently got no recommendations."""
    items = factor_frame(spark, range(3), np.eye(3))
    rows = [(7, 0, 1.0)] + [(7, 1, v) for v in strengths]
    interactions = spark.createDataFrame(rows, "user_idx int, item_idx int, strength double")
    with pytest.raises(InputDataError, match=r"fold-in: column 'strength' gives 1 \(user_idx, item_idx\) pairs"):
        fold_in_factors(interactions, items, SolveParams(alpha=1.0))


def test_fold_in_new_users_solves_only_users_without_factors(spark):
    rng = np.random.default_rng(8)
    items = factor_frame(spark, range(6), rng.normal(size=(6, 2)))
    known = factor_frame(spark, [0, 1], [[9.0, 9.0], [8.0, 8.0]])
    interactions = spark.createDataFrame([(0, 1, 1.0), (2, 3, 1.0), (2, 4, 2.0), (5, 0, 1.0)],
                                         "user_idx int, item_idx int, strength float")
    all_users, new_users = fold_in_new_users(known, items, interactions, SolveParams(alpha=3.0))
    assert sorted(r.id for r in new_users.collect()) == [2, 5]
    got = {r.id: r.features for r in all_users.collect()}
    assert sorted(got) == [0, 1, 2, 5] and got[0] == [9.0, 9.0]


# ---------------------------------------------------------------------------------------------
# checkerboard: the withheld item comes first once seen items are excluded


def test_checkerboard_withheld_item_is_recommended_first(spark):
    """implicit's get_checker_board: even users like even items, odd like odd; user u never saw item u."""
    from mf_spark.als.estimator import ImplicitALS

    n = 20
    rows = [(u, i, 1.0) for u in range(n) for i in range(n) if (u + i) % 2 == 0 and u != i]
    interactions = spark.createDataFrame(rows, "user_idx int, item_idx int, strength float")
    model = ImplicitALS(rank=4, maxIter=10, regParam=0.01, alpha=10.0, userCol="user_idx", itemCol="item_idx",
                        ratingCol="strength", numUserBlocks=2, numItemBlocks=2, seed=3).fit(interactions)
    recs = recommend_top_k(model.userFactors, model.itemFactors, 3, seen=interactions, src_block_size=6,
                           dst_chunk_size=7)
    top = {r.src: r.dst for r in recs.where("rank = 1").collect()}
    assert top == {u: u for u in range(n)}
    # without the exclusion the top item is one the user already has
    plain = {r.src: r.dst for r in recommend_top_k(model.userFactors, model.itemFactors, 1).collect()}
    assert any(plain[u] != u for u in range(n))


# ---------------------------------------------------------------------------------------------
# string ids


def test_to_string_ids_joins_both_maps(spark):
    recs = spark.createDataFrame([(0, 1, 1, 0.5), (0, 2, 0, 0.25), (1, 1, 0, 0.75)],
                                 "src int, rank int, dst int, score float")
    dim_user = spark.createDataFrame([("alice", 0), ("bob", 1)], "user_id string, user_idx int")
    dim_item = spark.createDataFrame([("apple", 0), ("pear", 1)], "item_id string, item_idx int")
    out = to_string_ids(recs, dim_user, dim_item)
    assert out.columns == ["user_id", "rank", "item_id", "score"]
    expected = spark.createDataFrame([("alice", 1, "pear", 0.5), ("alice", 2, "apple", 0.25), ("bob", 1, "apple", 0.75)],
                                     "user_id string, rank int, item_id string, score float")
    assertDataFrameEqual(out, expected)
    sims = spark.createDataFrame([(0, 1, 1, 0.9)], "item int, rank int, similar_item int, score float")
    assertDataFrameEqual(similar_to_string_ids(sims, dim_item),
                         spark.createDataFrame([("apple", 1, "pear", 0.9)],
                                               "item_id string, rank int, similar_item_id string, score float"))
    with pytest.raises(InputDataError, match="'user_id'"):
        to_string_ids(recs, dim_user.drop("user_id"), dim_item)


# ---------------------------------------------------------------------------------------------
# the recommend stage of a run directory (what jobs/recommend.py calls)


def test_recommend_stage_writes_both_tables_with_string_ids(spark, tmp_path):
    from mf_spark.recommend import RecommendSettings, run_recommend_stage

    rng = np.random.default_rng(6)
    users, items = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    run_dir, maps = tmp_path / "run", tmp_path / "id_maps"
    factor_frame(spark, range(5), users).write.parquet(str(run_dir / "user_factors"))
    factor_frame(spark, range(8), items).write.parquet(str(run_dir / "item_factors"))
    # user 5 has history but no factors: folded in
    history = [(u, i, 1.0) for u in range(6) for i in range(8) if (u * 3 + i) % 4 == 0]
    tables = [(history, "user_idx int, item_idx int, strength float", run_dir / "interactions"),
              ([(f"u{u}", u) for u in range(6)], "user_id string, user_idx int", maps / "dim_user" / "version=v1"),
              ([(f"i{i}", i) for i in range(8)], "item_id string, item_idx int", maps / "dim_item" / "version=v1")]
    for rows, schema, path in tables:
        spark.createDataFrame(rows, schema).write.parquet(str(path))
    # an older version beside the current one must not be read (the maps are versioned behind a pointer)
    spark.createDataFrame([("stale", 0)], "user_id string, user_idx int").write.parquet(str(maps / "dim_user" / "version=v0"))
    from mf_spark.ingest.id_maps import POINTER_FORMAT, swap_pointer

    swap_pointer(maps, {"format": POINTER_FORMAT, "maps": {
        "dim_user": {"path": "dim_user/version=v1", "size": 6}, "dim_item": {"path": "dim_item/version=v1", "size": 8}}})
    spark.createDataFrame([("i7",), ("unknown",)], "item_id string").write.parquet(str(tmp_path / "filter"))

    settings = RecommendSettings(top_n=3, similar_n=2, user_block_size=2, item_chunk_size=3,
                                 solve_params=SolveParams(alpha=2.0, reg_param=0.1))
    counts = run_recommend_stage(spark, str(run_dir), settings, id_map_dir=str(maps),
                                 item_filter_path=str(tmp_path / "filter"))
    recs = spark.read.parquet(str(run_dir / "recommendations"))
    sims = spark.read.parquet(str(run_dir / "similar_items"))
    assert recs.columns == ["user_id", "rank", "item_id", "score"]
    assert sims.columns == ["item_id", "rank", "similar_item_id", "score"]
    # the filtered item i7 keeps its own neighbours but is nobody's neighbour
    assert counts == {"recommendations": 18, "similar_items": 16, "folded_in_users": 1}

    seen = {(f"u{u}", f"i{i}") for u, i, _ in history}
    got = collected(recs, ("user_id", "rank", "item_id", "score"))
    known = [(f"u{s}", r, f"i{d}", sc) for s, r, d, sc in
             brute_force(np.arange(5), users, np.arange(7), items[:7], 3, {(u, i) for u, i, _ in history})]
    assert_same([g for g in got if g[0] != "u5"], sorted(known))
    assert [g[1] for g in got if g[0] == "u5"] == [1, 2, 3]
    assert not any((g[0], g[2]) in seen or g[2] == "i7" for g in got)
    self_pairs = {(i, i) for i in range(7)}
    cosine = brute_force(np.arange(8), items, np.arange(7), items[:7], 2, self_pairs, cosine=True)
    assert_same(collected(sims, ("item_id", "rank", "similar_item_id", "score")),
                sorted((f"i{s}", r, f"i{d}", sc) for s, r, d, sc in cosine))

    with pytest.raises(InputDataError, match="dim_user"):
        run_recommend_stage(spark, str(run_dir), settings)


def tiny_run_dir(spark, path):
    """A run directory holding everything the recommend stage reads, id maps included."""
    rng = np.random.default_rng(8)
    factor_frame(spark, range(4), rng.normal(size=(4, 3))).write.parquet(str(path / "user_factors"))
    factor_frame(spark, range(6), rng.normal(size=(6, 3))).write.parquet(str(path / "item_factors"))
    for rows, schema, name in (
        ([(u, (u + 1) % 6, 1.0) for u in range(4)], "user_idx int, item_idx int, strength float",
         "interactions"),
        ([(f"u{u}", u) for u in range(4)], "user_id string, user_idx int", "dim_user"),
        ([(f"i{i}", i) for i in range(6)], "item_id string, item_idx int", "dim_item"),
    ):
        spark.createDataFrame(rows, schema).write.parquet(str(path / name))
    return path


def test_recommend_stage_refuses_an_id_map_that_does_not_match_the_factors(spark, tmp_path):
    """A run copied from another output root was scored with this root's maps: indices of one joined
    to ids of the other, silently. The nightly writes each factor row's string id beside it."""
    from mf_spark.recommend import RecommendSettings, run_recommend_stage

    run_dir = tiny_run_dir(spark, tmp_path / "run")
    for side, n in (("user", 4), ("item", 6)):
        factors = spark.read.parquet(str(run_dir / f"{side}_factors"))
        written = factors.withColumn(f"{side}_id", F.concat(F.lit(side[0]), F.col("id").cast("string")))
        written.write.parquet(str(tmp_path / f"{side}_factors"))
    other_root = tmp_path / "other"
    spark.createDataFrame([(f"u{3 - u}", u) for u in range(4)], "user_id string, user_idx int").write.parquet(
        str(other_root / "dim_user"))
    for side in ("user", "item"):
        (run_dir / f"{side}_factors").rename(tmp_path / f"unused_{side}")
        (tmp_path / f"{side}_factors").rename(run_dir / f"{side}_factors")
    settings = RecommendSettings(top_n=2, similar_n=1)
    assert run_recommend_stage(spark, str(run_dir), settings)["recommendations"] == 8  # its own maps agree
    shutil.rmtree(run_dir / "dim_user")
    shutil.copytree(other_root / "dim_user", run_dir / "dim_user")
    with pytest.raises(InputDataError, match=r"the user ID map does not match the user factors in .*user_factors "
                                             r"\(index 0 is 'u0' there but 'u3' in the map"):
        run_recommend_stage(spark, str(run_dir), settings)


def test_recommend_stage_refuses_interactions_without_the_columns_it_reads(spark, tmp_path):
    """--interactions naming the ingest job's rejects table failed in fold-in with an analysis trace."""
    from mf_spark.recommend import RecommendSettings, run_recommend_stage

    run_dir = tiny_run_dir(spark, tmp_path / "run")
    rejects = tmp_path / "rejects"
    spark.createDataFrame([("u0", "i1", "bad")], "user_id string, item_id string, reason string").write.parquet(
        str(rejects))
    with pytest.raises(InputDataError, match=r"^recommend: interactions .*rejects: table has no column 'user_idx', "
                                             r"'item_idx', 'strength' \(columns: user_id, item_id, reason\)"):
        run_recommend_stage(spark, str(run_dir), RecommendSettings(top_n=2, similar_n=1),
                            interactions_path=str(rejects))
    assert not (run_dir / "recommendations").exists()


@pytest.mark.parametrize("failing", ["recommendations", "similar_items"])
def test_recommend_stage_that_fails_keeps_the_previous_tables(spark, tmp_path, monkeypatch, failing):
    """A failed rewrite of a (possibly published) run leaves its old tables readable and no temporaries.

    mode("overwrite") deleted the old table before computing the new one, so the run was left without one;
    then a failure in similar_items left new recommendations beside the old similar items.
    """
    from mf_spark.recommend import RecommendSettings, run_recommend_stage
    from mf_spark.recommend import tables as tables_module

    run_dir = tiny_run_dir(spark, tmp_path / "run")
    settings = RecommendSettings(top_n=2, similar_n=2)
    run_recommend_stage(spark, str(run_dir), settings)
    cols = ("user_id", "rank", "item_id", "score")
    before = collected(spark.read.parquet(str(run_dir / "recommendations")), cols)
    similar_cols = ("item_id", "rank", "similar_item_id")
    similar_before = collected(spark.read.parquet(str(run_dir / "similar_items")), similar_cols)
    assert len(before) == 8

    @F.udf("float")
    def fail(score):
        raise RuntimeError("injected failure while writing")

    real_build = tables_module.build_recommendation_tables

    def failing_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        setattr(built, failing, getattr(built, failing).withColumn("score", fail("score")))
        return built

    monkeypatch.setattr(tables_module, "build_recommendation_tables", failing_build)
    with pytest.raises(Exception, match="injected failure"):
        run_recommend_stage(spark, str(run_dir), RecommendSettings(top_n=3, similar_n=2))
    assert collected(spark.read.parquet(str(run_dir / "recommendations")), cols) == before
    assert collected(spark.read.parquet(str(run_dir / "similar_items")), similar_cols) == similar_before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []

    # and a rerun that succeeds replaces the tables, leaving nothing hidden behind
    monkeypatch.setattr(tables_module, "build_recommendation_tables", real_build)
    counts = run_recommend_stage(spark, str(run_dir), RecommendSettings(top_n=3, similar_n=1))
    assert counts["recommendations"] == 12 and counts["similar_items"] == 6
    assert spark.read.parquet(str(run_dir / "recommendations")).count() == 12
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_users_and_items_with_zero_factors_get_no_list(spark):
    """A user whose only interactions are returns has a zero factor; a list for them ranked ties at 0.
    So did a user with a positive interaction but a zero factor, and an item with a zero factor."""
    from mf_spark.recommend import RecommendSettings, build_recommendation_tables

    rng = np.random.default_rng(9)
    users, items = rng.normal(size=(3, 3)), rng.normal(size=(5, 3))
    users[2] = 0.0  # what ALS gives a user with no positive interaction
    users = np.vstack([users, np.zeros((1, 3))])  # user 4: a zero factor from an older model (--model)
    items = np.vstack([items, np.zeros((1, 3))])  # item 5: no positive interaction, a zero factor
    history = [(0, 0, 1.0), (0, 1, -1.0), (1, 2, 2.0), (2, 3, -1.0), (2, 4, -2.0),
               (3, 1, -1.0),  # user 3: no factors and nothing positive to fold in from
               (4, 0, 1.0),  # user 4 now has a positive interaction, but the model's factor is zero
               (5, 5, 1.0), (5, 1, -1.0)]  # user 5: new, positive only on item 5: folds in to zero
    interactions = spark.createDataFrame(history, "user_idx int, item_idx int, strength float")
    dim_user = spark.createDataFrame([(f"u{u}", u) for u in range(6)], "user_id string, user_idx int")
    dim_item = spark.createDataFrame([(f"i{i}", i) for i in range(6)], "item_id string, item_idx int")
    tables = build_recommendation_tables(
        factor_frame(spark, [0, 1, 2, 4], users), factor_frame(spark, range(6), items), interactions,
        dim_user, dim_item, RecommendSettings(top_n=2, similar_n=1, solve_params=SolveParams(alpha=1.0)),
    )
    per_user = {r.user_id: r["count"] for r in tables.recommendations.groupBy("user_id").count().collect()}
    assert per_user == {"u0": 2, "u1": 2}
    # the zero-factor item has no list of ties at score 0 and is nobody's neighbour
    similar = tables.similar_items.collect()
    assert sorted(r.item_id for r in similar) == ["i0", "i1", "i2", "i3", "i4"]
    assert "i5" not in {r.similar_item_id for r in similar}


def test_filters_that_leave_no_item_are_refused(spark, caplog):
    """An allow list of ids the ID map does not know (a double column: '85123.0') left every list empty,
    and the run was published with 0 recommendations."""
    from mf_spark.errors import InputDataError
    from mf_spark.recommend import RecommendSettings, build_recommendation_tables

    rng = np.random.default_rng(9)
    users, items = rng.normal(size=(2, 3)), rng.normal(size=(5, 3))
    interactions = spark.createDataFrame([(0, 0, 1.0), (1, 2, 2.0)], "user_idx int, item_idx int, strength float")
    dim_user = spark.createDataFrame([(f"u{u}", u) for u in range(2)], "user_id string, user_idx int")
    dim_item = spark.createDataFrame([(f"{i}", i) for i in range(5)], "item_id string, item_idx int")

    def build(**tables):
        return build_recommendation_tables(
            factor_frame(spark, range(2), users), factor_frame(spark, range(5), items), interactions,
            dim_user, dim_item, RecommendSettings(top_n=2, similar_n=1), **tables,
        )

    as_doubles = spark.createDataFrame([(1.0,), (3.0,)], "item_id double")
    with pytest.raises(InputDataError, match=r"allow list \(recommend\.allow_list_path\): none of its 2 item ids"):
        build(allow_list=as_doubles)
    everything = spark.createDataFrame([(str(i),) for i in range(5)], "item_id string")
    with pytest.raises(InputDataError, match="leave no item with factors to recommend"):
        build(item_filter=everything)
    partly_known = spark.createDataFrame([("1",), ("3",), ("x",)], "item_id string")
    with caplog.at_level(logging.WARNING, logger="mf_spark"):
        tables = build(allow_list=partly_known)
    assert "1 of its 3 item ids are unknown" in caplog.text
    # both users get both allowed items (neither has seen them): not merely nothing outside the list
    assert sorted((r.user_id, r.item_id) for r in tables.recommendations.collect()) == [
        ("u0", "1"), ("u0", "3"), ("u1", "1"), ("u1", "3")]
    tables.release()


def test_item_tables_that_cannot_be_read_name_the_key(spark, tmp_path):
    from mf_spark.errors import InputDataError
    from mf_spark.recommend.tables import read_item_table

    with pytest.raises(InputDataError, match=r"^recommend.item_filter_path = hdfs:///x: cannot be read as Parquet"):
        read_item_table(spark, "hdfs:///x", "item_filter_path")
    (tmp_path / "list.txt").write_text("not parquet\n")
    with pytest.raises(InputDataError, match=r"^recommend.allow_list_path = .*list.txt: cannot be read as Parquet"):
        read_item_table(spark, str(tmp_path / "list.txt"), "allow_list_path")
    assert read_item_table(spark, "", "allow_list_path") is None
    with pytest.raises(InputDataError, match=r"^recommend.allow_list_path = .*nothing does not exist$"):
        read_item_table(spark, str(tmp_path / "nothing"), "allow_list_path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"^recommend.item_filter_path = .*empty: holds no Parquet files$"):
        read_item_table(spark, str(tmp_path / "empty"), "item_filter_path")
    spark.createDataFrame([("a",)], "sku string").write.parquet(str(tmp_path / "skus"))
    with pytest.raises(InputDataError, match=r"^recommend.allow_list_path = .*skus: table has no column 'item_id'"):
        read_item_table(spark, str(tmp_path / "skus"), "allow_list_path")
