"""ImplicitALS on Spark: closed-form half-steps, agreement with MLlib, CG vs Cholesky, warm start,
determinism, routing vs broadcast, input validation, persistence and the MLlib-compatible API."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from pyspark.ml import Pipeline
from pyspark.sql import functions as F

from mf_spark import ImplicitALS, ImplicitALSModel
from mf_spark.errors import InputDataError, UsageError

# --- dense numpy reference (Hu, Koren and Volinsky 2008, MLlib's conventions) ----------------------


def reg_weights(n_pos, n_other, reg, mode, alpha0=0.1, nu=1.0):
    if mode == "count":
        return reg * n_pos
    if mode == "constant":
        return np.full(n_pos.shape, reg, dtype=np.float64)
    return reg * (n_pos + alpha0 * n_other) ** nu


def confidence(r, alpha, mode, eps=1.0):
    return 1 + alpha * (np.abs(r) if mode == "linear" else np.log1p(np.abs(r) / eps))


def dense_half_step(R, fixed, alpha, reg, reg_mode="count", conf_mode="linear"):
    """Solve every row of R (n_rows, n_cols; 0 = unobserved) against fixed column factors."""
    k = fixed.shape[1]
    gram = fixed.T @ fixed
    n_pos = (R > 0).sum(1)
    lam = reg_weights(n_pos, R.shape[1], reg, reg_mode)
    out = np.zeros((R.shape[0], k))
    for u in range(R.shape[0]):
        obs = np.nonzero(R[u])[0]
        if obs.size == 0:
            continue
        c = confidence(R[u, obs], alpha, conf_mode)
        y = fixed[obs]
        a = gram + (y.T * (c - 1)) @ y + lam[u] * np.eye(k)
        b = (y.T * (c * (R[u, obs] > 0))).sum(1)
        out[u] = np.linalg.solve(a, b)
    return out


def dense_objective(R, X, Y, alpha, reg, reg_mode="count", conf_mode="linear"):
    """sum_{u,i} c (p - x.y)^2 + sum_u lambda_u |x_u|^2 + sum_i lambda_i |y_i|^2 over all pairs."""
    S = X @ Y.T
    C = np.where(R != 0, confidence(R, alpha, conf_mode), 1.0)
    P = (R > 0).astype(float)
    lam_u = reg_weights((R > 0).sum(1), R.shape[1], reg, reg_mode)
    lam_i = reg_weights((R > 0).sum(0), R.shape[0], reg, reg_mode)
    return float((C * (P - S) ** 2).sum() + (lam_u * (X**2).sum(1)).sum() + (lam_i * (Y**2).sum(1)).sum())


def factors_matrix(df, n):
    rows = df.collect()
    k = len(rows[0]["features"])
    m = np.zeros((n, k))
    for r in rows:
        m[r["id"]] = r["features"]
    return m


def random_ratings(n_users, n_items, density, seed, negative_share=0.05):
    rng = np.random.default_rng(seed)
    R = np.zeros((n_users, n_items))
    mask = rng.random((n_users, n_items)) < density
    R[mask] = rng.integers(1, 6, mask.sum()).astype(float)
    neg = mask & (rng.random((n_users, n_items)) < negative_share)
    R[neg] = -1.0
    for u in range(n_users):  # every user and item has at least one rating
        if not mask[u].any():
            R[u, rng.integers(n_items)] = 1.0
    for i in range(n_items):
        if not (R[:, i] != 0).any():
            R[rng.integers(n_users), i] = 1.0
    return R


def to_frame(spark, R, user_col="user", item_col="item"):
    u, i = np.nonzero(R)
    rows = [(int(a), int(b), float(R[a, b])) for a, b in zip(u, i)]
    return spark.createDataFrame(rows, f"{user_col} int, {item_col} int, rating float")


def factor_frame(spark, M):
    return spark.createDataFrame([(i, [float(v) for v in row]) for i, row in enumerate(M)], "id int, features array<float>")


@pytest.fixture(scope="module")
def small(spark):
    R = random_ratings(40, 30, 0.15, seed=1)
    return R, to_frame(spark, R)


# --- 1. one half-step equals the dense closed form ---------------------------------------------


@pytest.mark.parametrize("reg_mode", ["count", "constant", "frequency"])
@pytest.mark.parametrize("conf_mode", ["linear", "log"])
def test_first_iteration_equals_dense_closed_form(spark, small, reg_mode, conf_mode):
    R, ratings = small
    rank, alpha, reg = 4, 3.0, 0.2
    rng = np.random.default_rng(5)
    X0 = rng.standard_normal((R.shape[0], rank)).astype(np.float32)
    Y0 = rng.standard_normal((R.shape[1], rank)).astype(np.float32)
    init = ImplicitALSModel(rank, factor_frame(spark, X0), factor_frame(spark, Y0))
    model = ImplicitALS(rank=rank, maxIter=1, alpha=alpha, regParam=reg, regularization=reg_mode,
                        confidence=conf_mode, solver="cholesky", numUserBlocks=3, numItemBlocks=2,
                        initialModel=init).fit(ratings)
    Y1 = dense_half_step(R.T, X0.astype(np.float64), alpha, reg, reg_mode, conf_mode)
    X1 = dense_half_step(R, Y1.astype(np.float32).astype(np.float64), alpha, reg, reg_mode, conf_mode)
    np.testing.assert_allclose(factors_matrix(model.itemFactors, R.shape[1]), Y1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(factors_matrix(model.userFactors, R.shape[0]), X1, rtol=1e-4, atol=1e-5)


def test_training_loss_is_the_exact_objective(spark, small):
    R, ratings = small
    model = ImplicitALS(rank=5, maxIter=3, alpha=2.0, regParam=0.1, solver="cholesky", numUserBlocks=2,
                        numItemBlocks=2, seed=3).fit(ratings)
    X = factors_matrix(model.userFactors, R.shape[0])
    Y = factors_matrix(model.itemFactors, R.shape[1])
    assert len(model.trainingLoss) == 3
    assert model.trainingLoss[-1] == pytest.approx(dense_objective(R, X, Y, 2.0, 0.1), rel=1e-4)
    assert model.trainingLoss[0] >= model.trainingLoss[1] >= model.trainingLoss[2]


def test_routing_equals_broadcast(spark, small):
    R, ratings = small
    common = dict(rank=4, maxIter=2, alpha=2.0, solver="cg", numUserBlocks=3, numItemBlocks=2, seed=11)
    routed = ImplicitALS(broadcastThreshold=0, **common).fit(ratings)
    broadcast = ImplicitALS(**common).fit(ratings)
    np.testing.assert_allclose(factors_matrix(routed.userFactors, R.shape[0]),
                               factors_matrix(broadcast.userFactors, R.shape[0]), rtol=1e-5, atol=1e-6)
    assert routed.trainingLoss == pytest.approx(broadcast.trainingLoss, rel=1e-6)


@pytest.mark.parametrize("broadcast_threshold", [0, 1 << 30])
def test_half_step_closures_do_not_grow_with_rank(spark, small, monkeypatch, broadcast_threshold):
    """Every half-step's closure stays in the lineage until the next checkpoint, so nothing of size
    rank x rank may ride in it (a captured Gramian made 3 MiB task binaries at rank 256 on Last.fm)."""
    from pyspark import cloudpickle

    from mf_spark.als import train

    R, ratings = small
    sizes: dict[int, list[int]] = {}
    real_half_step = train.half_step

    def measured(*args, **kwargs):
        rdd = real_half_step(*args, **kwargs)
        sizes.setdefault(rank, []).append(len(cloudpickle.dumps(rdd.func)))
        return rdd

    monkeypatch.setattr(train, "half_step", measured)
    for rank in (4, 128):
        ImplicitALS(rank=rank, maxIter=1, seed=3, broadcastThreshold=broadcast_threshold).fit(ratings)
    assert len(sizes[4]) == len(sizes[128]) == 2
    # a 128 x 128 float64 Gramian alone is 131 kB
    assert max(abs(a - b) for a, b in zip(sizes[4], sizes[128])) < 2_000


def test_executors_drop_old_broadcasts_every_iteration_without_checkpoints(spark, small, monkeypatch):
    """With checkpointing off every executor kept two broadcasts per iteration (each up to
    broadcastThreshold bytes: the whole fixed side) until the fit ended."""
    from pyspark.broadcast import Broadcast

    from mf_spark.als import train

    R, ratings = small
    created, released = [], []
    real_init, real_unpersist, real_half_step = Broadcast.__init__, Broadcast.unpersist, train.half_step

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        created.append(self)  # the objects, not their ids: a collected object's id is reused

    def tracked_unpersist(self, blocking=False):
        released.append(self)
        return real_unpersist(self, blocking)

    def alive() -> list:
        return [b for b in created if not any(b is r for r in released)]

    alive_at_half_step = []

    def counting_half_step(*args, **kwargs):
        alive_at_half_step.append(len(alive()))
        return real_half_step(*args, **kwargs)

    monkeypatch.setattr(Broadcast, "__init__", tracked_init)
    monkeypatch.setattr(Broadcast, "unpersist", tracked_unpersist)
    monkeypatch.setattr(train, "half_step", counting_half_step)
    ImplicitALS(rank=4, maxIter=5, seed=3, checkpointInterval=-1).fit(ratings)
    # only the broadcast of the half-step being built: the one before it is materialised
    assert alive_at_half_step == [1] * 10, alive_at_half_step
    assert not alive()  # and none is left on the executors after the fit


def test_broadcasts_before_a_checkpoint_are_destroyed(spark, small, monkeypatch):
    """PySpark deletes a broadcast's file on the driver only in destroy(): every half-step left one for
    the whole session. Once both sides are checkpointed no recomputation can read them."""
    from pyspark.broadcast import Broadcast

    R, ratings = small
    created = []
    real_init = Broadcast.__init__

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(Broadcast, "__init__", tracked_init)
    model = ImplicitALS(rank=4, maxIter=5, seed=3, checkpointInterval=2).fit(ratings)
    assert len(created) == 10
    # the checkpoint of iteration 4 frees iterations 1-3; 4's RDDs (serialised into 5's tasks) and 5's
    # lineage keep theirs
    assert [os.path.exists(b._path) for b in created] == [False] * 6 + [True] * 4
    # the model hands the survivors to whoever releases its factors (the nightly, the evaluation)
    assert [id(b) for b in model.trainingBroadcasts] == [id(b) for b in created[6:]]
    for broadcast in model.trainingBroadcasts:
        broadcast.destroy()
    assert not any(os.path.exists(b._path) for b in created)


def test_same_seed_and_blocks_give_same_factors(spark, small):
    R, ratings = small
    a = ImplicitALS(rank=4, maxIter=2, numUserBlocks=2, numItemBlocks=3, seed=9).fit(ratings)
    b = ImplicitALS(rank=4, maxIter=2, numUserBlocks=2, numItemBlocks=3, seed=9).fit(ratings.repartition(3))
    assert factors_matrix(a.userFactors, R.shape[0]).tolist() == factors_matrix(b.userFactors, R.shape[0]).tolist()
    c = ImplicitALS(rank=4, maxIter=2, numUserBlocks=2, numItemBlocks=3, seed=10).fit(ratings)
    assert factors_matrix(a.userFactors, R.shape[0]).tolist() != factors_matrix(c.userFactors, R.shape[0]).tolist()


@pytest.mark.parametrize("broadcast_threshold", [0, 1 << 30])
def test_packing_blocks_into_fewer_tasks_changes_nothing(spark, small, monkeypatch, broadcast_threshold):
    """In local[2], 5x3 blocks run as 2 tasks per stage; one block per task must give the same model."""
    from mf_spark.als import blocks

    R, ratings = small
    kw = dict(rank=4, maxIter=3, numUserBlocks=5, numItemBlocks=3, seed=4, broadcastThreshold=broadcast_threshold)
    assert blocks.num_task_partitions(spark.sparkContext, 5) == 2
    packed = ImplicitALS(**kw).fit(ratings)
    monkeypatch.setattr(blocks, "num_task_partitions", lambda sc, num_blocks: num_blocks)
    one_per_task = ImplicitALS(**kw).fit(ratings)
    for side, n in (("userFactors", R.shape[0]), ("itemFactors", R.shape[1])):
        a, b = factors_matrix(getattr(packed, side), n), factors_matrix(getattr(one_per_task, side), n)
        assert a.tolist() == b.tolist()
    assert packed.trainingLoss == one_per_task.trainingLoss


def test_duplicates_are_summed(spark):
    dup = spark.createDataFrame([(0, 0, 1.0), (0, 0, 2.0), (0, 1, 1.0), (1, 1, 4.0), (1, 0, 1.0)], "user int, item int, rating float")
    summed = spark.createDataFrame([(0, 0, 3.0), (0, 1, 1.0), (1, 1, 4.0), (1, 0, 1.0)], "user int, item int, rating float")
    kw = dict(rank=2, maxIter=2, numUserBlocks=1, numItemBlocks=1, seed=1, solver="cholesky")
    a = ImplicitALS(**kw).fit(dup)
    b = ImplicitALS(**kw).fit(summed)
    assert factors_matrix(a.userFactors, 2).tolist() == factors_matrix(b.userFactors, 2).tolist()


# --- 2. agreement with MLlib ------------------------------------------------------------------


def precision_at_10(R_train, R_test, X, Y):
    scores = X @ Y.T
    scores[R_train != 0] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    users = np.nonzero((R_test > 0).any(1))[0]
    return float(np.mean([(R_test[u, top[u]] > 0).sum() / 10 for u in users]))


def test_cholesky_matches_mllib_objective_and_precision(spark):
    from pyspark.ml.recommendation import ALS

    R = random_ratings(150, 80, 0.08, seed=21, negative_share=0.0)
    # structured data so that precision is meaningful: two taste groups
    rng = np.random.default_rng(2)
    R[:75, :40] += (rng.random((75, 40)) < 0.25) * 2
    R[75:, 40:] += (rng.random((75, 40)) < 0.25) * 2
    mask = (R != 0) & (rng.random(R.shape) < 0.2)
    R_test, R_train = np.where(mask, R, 0), np.where(mask, 0, R)
    train = to_frame(spark, R_train)
    kw = dict(rank=8, maxIter=10, regParam=0.1, alpha=5.0, seed=0, numUserBlocks=2, numItemBlocks=2)
    ours = ImplicitALS(solver="cholesky", **kw).fit(train)
    mllib = ALS(implicitPrefs=True, userCol="user", itemCol="item", ratingCol="rating", **kw).fit(train)
    n_u, n_i = R.shape
    obj_ours = dense_objective(R_train, factors_matrix(ours.userFactors, n_u), factors_matrix(ours.itemFactors, n_i), 5.0, 0.1)
    obj_mllib = dense_objective(R_train, factors_matrix(mllib.userFactors, n_u), factors_matrix(mllib.itemFactors, n_i), 5.0, 0.1)
    assert obj_ours <= obj_mllib * 1.01
    p_ours = precision_at_10(R_train, R_test, factors_matrix(ours.userFactors, n_u), factors_matrix(ours.itemFactors, n_i))
    p_mllib = precision_at_10(R_train, R_test, factors_matrix(mllib.userFactors, n_u), factors_matrix(mllib.itemFactors, n_i))
    assert p_ours >= p_mllib * 0.98


def test_cholesky_from_mllibs_initial_factors_reproduces_mllib(spark):
    """Same math as MLlib, not just the same objective: started from MLlib's own initial factors
    (its ``maxIter=0`` model), the exact solver lands on MLlib's factors, negative ratings included.
    So any quality difference at equal parameters is the draw of the initial factors."""
    from pyspark.ml.recommendation import ALS

    R = random_ratings(60, 45, 0.12, seed=8)
    ratings = to_frame(spark, R)
    kw = dict(rank=6, regParam=0.05, alpha=3.0, seed=5, numUserBlocks=2, numItemBlocks=3)
    init = ALS(implicitPrefs=True, maxIter=0, userCol="user", itemCol="item", ratingCol="rating", **kw).fit(ratings)
    mllib = ALS(implicitPrefs=True, maxIter=6, userCol="user", itemCol="item", ratingCol="rating", **kw).fit(ratings)
    start = ImplicitALSModel(rank=6, userFactors=init.userFactors, itemFactors=init.itemFactors)
    ours = ImplicitALS(solver="cholesky", maxIter=6, initialModel=start, **kw).fit(ratings)
    n_u, n_i = R.shape
    X_ours, Y_ours = factors_matrix(ours.userFactors, n_u), factors_matrix(ours.itemFactors, n_i)
    X_mllib, Y_mllib = factors_matrix(mllib.userFactors, n_u), factors_matrix(mllib.itemFactors, n_i)
    np.testing.assert_allclose(X_ours, X_mllib, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(Y_ours, Y_mllib, rtol=1e-3, atol=1e-4)
    # and from its own draw it is a different (equally good) solution, so the check above is not vacuous
    own = ImplicitALS(solver="cholesky", maxIter=6, **kw).fit(ratings)
    assert not np.allclose(factors_matrix(own.userFactors, n_u), X_mllib, rtol=1e-3, atol=1e-4)


# --- 3. CG vs Cholesky; 4. warm start -------------------------------------------------------------


def test_cg_reaches_cholesky_objective(spark):
    R = random_ratings(120, 90, 0.08, seed=4)
    ratings = to_frame(spark, R)
    kw = dict(rank=8, maxIter=15, alpha=5.0, regParam=0.1, seed=2, numUserBlocks=2, numItemBlocks=2)
    cg = ImplicitALS(solver="cg", cgSteps=3, **kw).fit(ratings)
    chol = ImplicitALS(solver="cholesky", **kw).fit(ratings)
    assert cg.trainingLoss[-1] <= chol.trainingLoss[-1] * 1.01


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_an_item_with_only_returns_gets_a_zero_factor_and_no_similar_items(spark, small, solver):
    """CG's warm start left ~1e-8 in the factor of an item with no positive rating: it passed the
    all-zero filter of similar_items and got unit-length cosine neighbours (0.69 in the review)."""
    from mf_spark.recommend import similar_items

    R = small[0].copy()
    returns_only = R.shape[1]
    R = np.hstack([R, np.zeros((R.shape[0], 1))])
    R[[1, 5, 9], returns_only] = -1.0
    model = ImplicitALS(rank=8, maxIter=3, regParam=0.1, alpha=10.0, seed=1, numUserBlocks=2, numItemBlocks=2,
                        solver=solver).fit(to_frame(spark, R))
    factors = factors_matrix(model.itemFactors, R.shape[1])
    assert np.all(factors[returns_only] == 0.0)
    assert np.all(np.any(factors[:returns_only] != 0.0, axis=1) == np.any(R[:, :returns_only] > 0, axis=0))
    sims = similar_items(model.itemFactors, 3)
    assert sims.where(f"item = {returns_only} or similar_item = {returns_only}").count() == 0
    assert sims.count() > 0


def test_warm_start_converges_in_fewer_iterations(spark):
    R = random_ratings(100, 60, 0.1, seed=8)
    ratings = to_frame(spark, R)
    kw = dict(rank=6, alpha=5.0, regParam=0.1, seed=2, numUserBlocks=2, numItemBlocks=2, solver="cholesky")
    cold = ImplicitALS(maxIter=12, **kw).fit(ratings)
    target = cold.trainingLoss[-1] * 1.001
    cold_iters = next(i for i, v in enumerate(cold.trainingLoss, 1) if v <= target)
    # yesterday's model, then a day with a few more interactions
    base = ImplicitALS(maxIter=12, **kw).fit(ratings)
    R2 = R.copy()
    R2[0, 1] = R2[0, 1] or 2.0
    R2[5, 7] = R2[5, 7] or 1.0
    ratings2 = to_frame(spark, R2)
    cold2 = ImplicitALS(maxIter=12, **kw).fit(ratings2)
    warm2 = ImplicitALS(maxIter=12, initialModel=base, **kw).fit(ratings2)
    target2 = cold2.trainingLoss[-1] * 1.001
    cold2_iters = next(i for i, v in enumerate(cold2.trainingLoss, 1) if v <= target2)
    warm2_iters = next(i for i, v in enumerate(warm2.trainingLoss, 1) if v <= target2)
    assert cold_iters > 1
    assert warm2_iters < cold2_iters


def test_warm_start_new_ids_get_factors(spark, small):
    R, ratings = small
    base = ImplicitALS(rank=4, maxIter=2, seed=1, numUserBlocks=2, numItemBlocks=2).fit(ratings.where("user < 30"))
    grown = ImplicitALS(rank=4, maxIter=1, seed=1, numUserBlocks=2, numItemBlocks=2, initialModel=base).fit(ratings)
    assert grown.userFactors.count() == R.shape[0]
    with pytest.raises(ValueError, match="rank"):
        ImplicitALS(rank=5, maxIter=1, initialModel=base).fit(ratings)


def test_checkpoint_files_are_deleted_once_their_rdd_is_unreachable(spark):
    """Checkpoints stayed in spark.checkpoint.dir until the job ended: a backfill or a tuning run piled
    up every fit's (build_session sets spark.cleaner.referenceTracking.cleanCheckpoints)."""
    import gc
    import time
    from urllib.parse import urlparse

    sc = spark.sparkContext
    assert sc.getConf().get("spark.cleaner.referenceTracking.cleanCheckpoints") == "true"
    rdd = sc.parallelize(range(100), 2)
    rdd.checkpoint()
    rdd.count()
    path = urlparse(rdd.getCheckpointFile()).path
    assert os.path.isdir(path)
    del rdd
    deadline = time.monotonic() + 60
    while os.path.exists(path) and time.monotonic() < deadline:
        gc.collect()
        sc._jvm.System.gc()
        time.sleep(0.5)
    assert not os.path.exists(path)


def test_many_iterations_with_checkpointing(spark, small):
    """Also: each checkpoint deletes the previous one's files, as MLlib's fit does. They stayed until
    Spark's cleaner (off in a session that does not enable cleanCheckpoints) or the end: 20 here."""
    from urllib.parse import urlparse

    _, ratings = small
    directory = urlparse(spark.sparkContext.getCheckpointDir()).path
    before = set(os.listdir(directory))
    model = ImplicitALS(rank=3, maxIter=30, checkpointInterval=3, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    assert len(model.trainingLoss) == 30
    assert np.isfinite(model.trainingLoss).all()
    assert len(set(os.listdir(directory)) - before) <= 2  # the last checkpoint: the factors' lineage
    assert model.userFactors.count() > 0


# --- input validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, schema, message",
    [
        ([(2**31, 1, 1.0)], "user long, item int, rating float", "'user'.*Int range"),
        ([(None, 1, 1.0), (1, 1, 1.0)], "user int, item int, rating float", "'user'"),
        ([(1, 1, float("nan"))], "user int, item int, rating float", "'rating'.*NaN"),
        ([(1, 1, float("inf")), (2, 1, None)], "user int, item int, rating double", "2 values of 'rating'.*infinite"),
        # finite in float64, infinite in the float32 blocks: it trained an all-NaN model without a word
        ([(1, 1, 1e39), (2, 1, 1.0)], "user int, item int, rating double", "1 values of 'rating'.*float32"),
        # each row within float32, their sum not: it trained an all-NaN model too
        ([(1, 1, 3e38), (1, 1, 3e38), (2, 1, 1.0)], "user int, item int, rating double",
         r"1 \('user', 'item'\) pairs have duplicate rows whose 'rating' values sum beyond float32"),
        ([(1, 2**40, 1.0)], "user int, item long, rating float", "'item'.*Int range"),
        ([(1, None, 1.0)], "user int, item long, rating float", "'item'"),
        ([(1.5, 1, 1.0)], "user double, item int, rating float", "'user'"),
        ([], "user int, item int, rating float", "no ratings to train on .*'user', 'item', 'rating'"),
    ],
)
def test_bad_input_is_rejected_with_the_column_named(spark, rows, schema, message):
    with pytest.raises(InputDataError, match=message):
        ImplicitALS(rank=2, maxIter=1).fit(spark.createDataFrame(rows, schema))


def test_bad_values_are_named_by_the_callers_column(spark):
    df = spark.createDataFrame([(1, 2.5, 1.0)], "account int, sku double, clicks float")
    with pytest.raises(InputDataError, match="1 values of 'sku'"):
        ImplicitALS(rank=2, maxIter=1, userCol="account", itemCol="sku", ratingCol="clicks").fit(df)


def test_missing_column_and_string_ids(spark):
    df = spark.createDataFrame([("a", 1, 1.0)], "user string, item int, rating float")
    with pytest.raises(InputDataError, match="'user'"):
        ImplicitALS(rank=2, maxIter=1).fit(df)
    with pytest.raises(InputDataError, match="no column 'score'"):
        ImplicitALS(rank=2, maxIter=1, ratingCol="score").fit(df)


def test_an_empty_rating_column_means_every_rating_is_one(spark, small):
    """MLlib's ratingCol="" (lit(1.0)) was refused as "input has no column ''"."""
    R, ratings = small
    ones = ratings.select("user", "item", F.lit(1.0).alias("rating"))
    settings = dict(rank=3, maxIter=2, numUserBlocks=2, numItemBlocks=2, seed=5, solver="cholesky")
    without = ImplicitALS(ratingCol="", **settings).fit(ratings.drop("rating"))
    with_ones = ImplicitALS(**settings).fit(ones)
    assert factors_matrix(without.userFactors, R.shape[0]).tolist() == \
        factors_matrix(with_ones.userFactors, R.shape[0]).tolist()


def test_mllib_only_modes_are_refused(spark, small):
    _, ratings = small
    with pytest.raises(ValueError, match="implicitPrefs"):
        ImplicitALS(implicitPrefs=False).fit(ratings)
    with pytest.raises(ValueError, match="nonnegative"):
        ImplicitALS(nonnegative=True).fit(ratings)


# --- the model API ----------------------------------------------------------------------------


def test_transform_cold_start_and_persistence(spark, small, tmp_path):
    R, ratings = small
    model = ImplicitALS(rank=3, maxIter=2, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    queries = spark.createDataFrame([(0, 0), (0, 999), (999, 0)], "user int, item int")
    scored = {(r.user, r.item): r.prediction for r in model.transform(queries).collect()}
    X = factors_matrix(model.userFactors, R.shape[0])
    Y = factors_matrix(model.itemFactors, R.shape[1])
    assert scored[(0, 0)] == pytest.approx(float(X[0] @ Y[0]), rel=1e-5)
    assert np.isnan(scored[(0, 999)]) and np.isnan(scored[(999, 0)])
    nulls = spark.createDataFrame([(None, 0), (0, None)], "user int, item int")  # docs/als.md: cold starts
    assert [np.isnan(r.prediction) for r in model.transform(nulls).collect()] == [True, True]
    assert model.setColdStartStrategy("drop").transform(queries).count() == 1
    assert model.setColdStartStrategy("DROP").transform(queries).count() == 1  # MLlib lower-cases it
    with pytest.raises(ValueError, match="coldStartStrategy must be one of"):
        model.setColdStartStrategy("skip")
    model.setColdStartStrategy("drop")
    assert dict(model.transform(queries).dtypes)["prediction"] == "float"
    # as MLlib: a second model's transform must not overwrite the first one's predictions silently
    with pytest.raises(InputDataError, match="already has a column 'prediction'"):
        model.transform(model.transform(queries))
    # a param map given to transform() bypassed the setter's check and behaved as "nan"
    with pytest.raises(ValueError, match="coldStartStrategy must be one of"):
        model.transform(queries, {model.coldStartStrategy: "skip"})

    path = str(tmp_path / "model")
    model.write().overwrite().save(path)
    loaded = ImplicitALSModel.load(path)
    assert loaded.rank == 3 and loaded.trainingLoss == model.trainingLoss
    # how it was trained travels with it (MLlib's model keeps only its own Params)
    assert model.trainingParams["maxIter"] == 2 and model.trainingParams["solver"] == "cg"
    assert loaded.trainingParams == model.trainingParams and loaded.provenance == {}
    assert loaded.getColdStartStrategy() == "drop"
    assert factors_matrix(loaded.userFactors, R.shape[0]).tolist() == X.tolist()

    # jobs/train.py's save: a second save replaces the first only once it is complete, and leaves no temporary
    from mf_spark.pipeline import check_model_out, save_model

    check_model_out(path)  # a saved model may be replaced
    save_model(model, path)
    assert ImplicitALSModel.load(path).trainingLoss == model.trainingLoss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    est = ImplicitALS(rank=7, solver="cholesky", regularization="frequency")
    est.write().overwrite().save(str(tmp_path / "est"))
    est2 = ImplicitALS.load(str(tmp_path / "est"))
    assert est2.getOrDefault("rank") == 7 and est2.getOrDefault("regularization") == "frequency"
    # the wrong class's directory: ImplicitALS.load returned a model, ImplicitALSModel.load raised KeyError 'rank'
    with pytest.raises(Exception, match=r"mf_spark\.als\.estimator\.ImplicitALS.*mf_spark\.als\.model\.ImplicitALSModel"):
        ImplicitALS.load(path)
    with pytest.raises(ValueError, match=r"est holds a saved mf_spark\.als\.estimator\.ImplicitALS, not a model of "
                                         r"mf_spark\.als\.model\.ImplicitALSModel or org\.apache\.spark\.ml\.recommendation\.ALSModel"):
        ImplicitALSModel.load(str(tmp_path / "est"))
    # ...but not an estimator's directory, nor any other with a metadata/ (it was replaced whole)
    (tmp_path / "project" / "metadata").mkdir(parents=True)
    for not_a_model in (tmp_path / "est", tmp_path / "project"):
        with pytest.raises(UsageError, match="exists and is not a saved model"):
            check_model_out(str(not_a_model))


def test_every_mllib_setter_and_getter_exists_and_sets_its_param():
    """The docs promise that changing the import keeps an ALS pipeline working; als.setRank(...) raised
    AttributeError."""
    from pyspark.ml.recommendation import ALS

    mllib = {name for name in dir(ALS) if name.startswith(("set", "get"))}
    assert mllib <= set(dir(ImplicitALS)), sorted(mllib - set(dir(ImplicitALS)))
    est = (ImplicitALS().setRank(4).setMaxIter(3).setRegParam(0.5).setAlpha(2.0).setNumBlocks(3)
           .setUserCol("u").setItemCol("i").setRatingCol("r").setSeed(9).setCheckpointInterval(2)
           .setColdStartStrategy("DROP").setFinalStorageLevel("MEMORY_AND_DISK_SER").setSolver("cholesky"))
    assert (est.getRank(), est.getMaxIter(), est.getRegParam(), est.getAlpha()) == (4, 3, 0.5, 2.0)
    assert (est.getNumUserBlocks(), est.getNumItemBlocks()) == (3, 3)
    assert (est.getUserCol(), est.getItemCol(), est.getRatingCol(), est.getSeed()) == ("u", "i", "r", 9)
    assert (est.getColdStartStrategy(), est.getSolver(), est.getCheckpointInterval()) == ("drop", "cholesky", 2)
    est._validate()  # MLlib's level names, _SER ones included, are accepted
    # this project's extras have theirs too
    extras = (ImplicitALS().setCgSteps(5).setRegularization("frequency").setConfidence("log").setConfidenceEpsilon(0.5)
              .setFrequencyAlpha0(0.2).setFrequencyNu(0.5).setBroadcastThreshold(1024).setComputeLoss(False))
    assert (extras.getCgSteps(), extras.getRegularization(), extras.getConfidence(), extras.getConfidenceEpsilon(),
            extras.getFrequencyAlpha0(), extras.getFrequencyNu(), extras.getBroadcastThreshold(),
            extras.getComputeLoss()) == (5, "frequency", "log", 0.5, 0.2, 0.5, 1024, False)
    with pytest.raises(ValueError, match="intermediateStorageLevel = 'MEMORY' is not a storage level"):
        est.setIntermediateStorageLevel("MEMORY")._validate()


def test_seed_none_means_the_default_seed(spark, small):
    """setSeed(None) stored None, and the fit failed inside the executors drawing the initial factors."""
    R, ratings = small
    kw = dict(rank=3, maxIter=1, numUserBlocks=2, numItemBlocks=2)
    default = ImplicitALS(**kw).fit(ratings).trainingLoss
    assert ImplicitALS(**kw).setSeed(7).setSeed(None).fit(ratings).trainingLoss == default
    assert ImplicitALS(**kw).setParams(seed=7).setParams(seed=None).getSeed() == ImplicitALS().getSeed()


def test_max_iter_zero_gives_the_initial_factors_as_mllib(spark, small):
    """MLlib accepts maxIter >= 0 (0: the initial factors; benchmarks/same_params.py warm-starts from one);
    ImplicitALS refused 0."""
    R, ratings = small
    initial = ImplicitALS(rank=3, maxIter=0, seed=5, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    X = factors_matrix(initial.userFactors, R.shape[0])
    assert initial.trainingLoss == [] and np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-6)
    one = ImplicitALS(rank=3, maxIter=1, seed=5, numUserBlocks=2, numItemBlocks=2)
    warm = one.setInitialModel(initial).fit(ratings)
    assert warm.trainingLoss == one.setInitialModel(None).fit(ratings).trainingLoss  # the same start
    with pytest.raises(ValueError, match="maxIter must be >= 0"):
        ImplicitALS(maxIter=-1).fit(ratings)
    with pytest.raises(ValueError, match="checkpointInterval must be >= 1, or -1"):
        ImplicitALS(checkpointInterval=-2).fit(ratings)


def test_transform_takes_long_ids_beyond_int_range_as_cold_start(spark, small):
    # cast("int") raised CAST_OVERFLOW under ANSI mode and failed the job; MLlib users pass bigint ids.
    R, ratings = small
    model = ImplicitALS(rank=3, maxIter=1, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    queries = spark.createDataFrame([(0, 0), (2**40, 0), (0, -(2**40))], "user bigint, item bigint")
    scored = {(r.user, r.item): r.prediction for r in model.transform(queries).collect()}
    X = factors_matrix(model.userFactors, R.shape[0])
    Y = factors_matrix(model.itemFactors, R.shape[1])
    assert scored[(0, 0)] == pytest.approx(float(X[0] @ Y[0]), rel=1e-5)
    assert np.isnan(scored[(2**40, 0)]) and np.isnan(scored[(0, -(2**40))])
    strings = spark.createDataFrame([("a", 0)], "user string, item int")
    with pytest.raises(InputDataError, match="column 'user' must be numeric"):
        model.transform(strings)


def test_recommend_for_all_has_mllib_schema(spark, small):
    R, ratings = small
    model = ImplicitALS(rank=3, maxIter=2, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    recs = model.recommendForAllUsers(5)
    assert recs.schema.simpleString() == "struct<user:int,recommendations:array<struct<item:int,rating:float>>>"
    X = factors_matrix(model.userFactors, R.shape[0])
    Y = factors_matrix(model.itemFactors, R.shape[1])
    row = recs.where("user = 3").first()
    expected = np.argsort(-(X[3] @ Y.T), kind="stable")[:5]
    assert [r.item for r in row.recommendations] == expected.tolist()
    items = model.recommendForAllItems(4)
    assert items.schema.simpleString() == "struct<item:int,recommendations:array<struct<user:int,rating:float>>>"
    subset = model.recommendForUserSubset(spark.createDataFrame([(1,), (2,), (2,)], "user int"), 3)
    assert sorted(r.user for r in subset.collect()) == [1, 2]
    assert model.recommendForItemSubset(spark.createDataFrame([(0,)], "item int"), 3).count() == 1


def test_works_in_a_pipeline_with_custom_columns(spark, small):
    R, _ = small
    df = to_frame(spark, R, "account", "sku").withColumnRenamed("rating", "clicks")
    als = ImplicitALS(rank=3, maxIter=2, userCol="account", itemCol="sku", ratingCol="clicks",
                      numUserBlocks=2, numItemBlocks=2)
    model = Pipeline(stages=[als]).fit(df)
    out = model.transform(df.limit(5))
    assert out.where(F.isnan("prediction")).count() == 0


def test_objective_scores_any_factors_exactly(spark, small):
    from mf_spark.als.blocks import select_ratings
    from mf_spark.als.params import SolveParams
    from mf_spark.als.train import objective

    R, ratings = small
    model = ImplicitALS(rank=4, maxIter=2, alpha=2.0, regParam=0.1, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    X = factors_matrix(model.userFactors, R.shape[0])
    Y = factors_matrix(model.itemFactors, R.shape[1])
    value = objective(spark, select_ratings(ratings, "user", "item", "rating"), model.userFactors,
                      model.itemFactors, SolveParams(alpha=2.0, reg_param=0.1), num_blocks=3)
    assert value == pytest.approx(dense_objective(R, X, Y, 2.0, 0.1), rel=1e-5)


def test_objective_does_not_depend_on_how_blocks_share_tasks(spark, monkeypatch):
    """Per-block losses were added in collect order, which follows the task partitions: with 8 blocks,
    local[2] packs them [0, 2, 4, 6, 1, 3, 5, 7] and a cluster [0..7], and the sums differed in the last
    bit. The blocks now add in block order, as training does."""
    from mf_spark.als import blocks as blocks_module
    from mf_spark.als.blocks import select_ratings
    from mf_spark.als.params import SolveParams
    from mf_spark.als.train import objective

    rng = np.random.default_rng(5)
    rows = {(int(u), int(i)): float(r) for u, i, r in zip(rng.integers(0, 400, 3000), rng.integers(0, 300, 3000),
                                                           rng.lognormal(0, 2, 3000))}
    ratings = spark.createDataFrame([(u, i, r) for (u, i), r in sorted(rows.items())], "user int, item int, rating float")
    model = ImplicitALS(rank=6, maxIter=1, alpha=3.0, regParam=0.1, numUserBlocks=8, numItemBlocks=8).fit(ratings)
    selected = select_ratings(ratings, "user", "item", "rating")
    params = SolveParams(alpha=3.0, reg_param=0.1)
    values = set()
    for packing in (lambda sc, n: min(n, 2), lambda sc, n: n, lambda sc, n: 3):
        monkeypatch.setattr(blocks_module, "num_task_partitions", packing)
        values.add(objective(spark, selected, model.userFactors, model.itemFactors, params, num_blocks=8))
    assert len(values) == 1, values


def test_tasks_limit_blas_to_their_cpus(spark):
    """Two tasks per 2 cores each starting a BLAS thread per core oversubscribed the machine (the CG
    kernel ran 9x slower); inside a task the limit is spark.task.cpus."""
    from threadpoolctl import threadpool_info

    from mf_spark.blas import task_blas_threads

    def blas_threads(_):
        import numpy  # noqa: F401  (loads OpenBLAS in the worker, as the solvers do)

        with task_blas_threads():
            inside = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        yield inside

    inside = spark.sparkContext.parallelize(range(2), 2).mapPartitions(blas_threads).collect()
    assert inside and all(threads == [1] * len(threads) and threads for threads in inside)


def test_fits_do_not_pile_up_accumulators_on_the_driver(spark, small):
    """Each half-step's accumulator, holding its per-block Gramians, stayed in PySpark's registry for the
    driver's life: about 110 MiB per fit at rank 256, 10 blocks, 10 iterations."""
    from pyspark.accumulators import _accumulatorRegistry

    R, ratings = small
    kw = dict(rank=4, maxIter=3, numUserBlocks=2, numItemBlocks=2, checkpointInterval=-1)
    ImplicitALS(**kw).fit(ratings)
    before = len(_accumulatorRegistry)
    for _ in range(2):
        ImplicitALS(**kw).fit(ratings)
    assert len(_accumulatorRegistry) == before


def test_chunked_encoding_changes_nothing(spark, small, monkeypatch):
    from mf_spark.als import blocks

    R, ratings = small
    kw = dict(rank=4, maxIter=2, numUserBlocks=3, numItemBlocks=2, seed=2)
    expected = ImplicitALS(**kw).fit(ratings)
    monkeypatch.setattr(blocks, "MAX_CHUNK_RATINGS", 5)
    monkeypatch.setattr(blocks, "MAX_BATCH_BYTES", 300)
    chunked = ImplicitALS(**kw).fit(ratings)
    assert chunked.trainingLoss == expected.trainingLoss
    n_users = R.shape[0]
    assert np.array_equal(factors_matrix(chunked.userFactors, n_users), factors_matrix(expected.userFactors, n_users))


def test_block_statistics_merge_is_idempotent_under_retries():
    from mf_spark.als.train import _BlockStatsParam

    param = _BlockStatsParam()
    merged = param.addInPlace(param.zero({}), {0: (1.0, 2)})
    merged = param.addInPlace(merged, {1: (3.0, 4)})
    merged = param.addInPlace(merged, {0: (1.0, 2)})  # block 0's task ran again
    assert merged == {0: (1.0, 2), 1: (3.0, 4)}


def test_blocks_too_large_to_travel_are_refused_before_the_fit(spark, small, monkeypatch):
    """A block's factors travel as one binary value (2 GiB at most): 10M users at rank 128 in 2 blocks
    failed only when the trained factors were written, after the whole fit."""
    from mf_spark.als import train
    from mf_spark.als.train import TrainSettings, check_block_sizes
    from mf_spark.errors import ConfigError

    settings = TrainSettings(rank=128, num_user_blocks=2, num_item_blocks=2)
    with pytest.raises(ConfigError, match=r"numUserBlocks = 2 puts about 5000000 users of rank 128 in one block "
                                          r"\(2\.4 GiB .*train\.num_user_blocks\) to at least 5"):
        check_block_sizes(10_000_000, 1000, settings)
    check_block_sizes(10_000_000, 1000, TrainSettings(rank=128, num_user_blocks=5, num_item_blocks=2))

    R, ratings = small
    monkeypatch.setattr(train, "MAX_BLOCK_FACTOR_BYTES", 4 * 4 * 3)  # three rank-4 factors per block
    with pytest.raises(ConfigError, match="numItemBlocks = 2 puts about"):
        ImplicitALS(rank=4, maxIter=1, numUserBlocks=R.shape[0], numItemBlocks=2).fit(ratings)


def test_rating_blocks_too_large_to_cache_name_the_block_count_to_set(spark, small, monkeypatch):
    """A block of ratings is cached as one pickled value: above 2 GiB (about 200M ratings) PySpark's
    "can not serialize object larger than 2G" stopped the fit, naming no setting."""
    from mf_spark.als import blocks
    from mf_spark.errors import ConfigError

    R, ratings = small
    nnz = int((R != 0).sum())
    monkeypatch.setattr(blocks, "MAX_IN_BLOCK_BYTES", 9 * nnz // 2)  # about half the ratings per block
    with pytest.raises(ConfigError, match=rf"^ImplicitALS: user block 0 of 1 holds {nnz} ratings \(0\.00 GiB; .*"
                                          r"set numUserBlocks \(train\.num_user_blocks\) to at least [3-9]$"):
        ImplicitALS(rank=4, maxIter=1, numUserBlocks=1, numItemBlocks=4).fit(ratings)
    ImplicitALS(rank=4, maxIter=1, numUserBlocks=4, numItemBlocks=4).fit(ratings)


def test_a_routed_fit_warns_when_one_task_gathers_too_many_factors(spark, small, monkeypatch, caplog):
    """Each block of a routed half-step receives the factors of every fixed-side entity that rated it:
    at 50M users over 32 item blocks about 18 GiB per task, which nothing said before executors died."""
    from mf_spark.als import train

    R, ratings = small
    users_per_item_block = max(len(np.unique(np.nonzero(R[:, b::3])[0])) for b in range(3))
    items_per_user_block = max(len(np.unique(np.nonzero(R[b::2])[1])) for b in range(2))
    monkeypatch.setattr(train, "ROUTED_FACTORS_WARN_BYTES", 4 * 4 * (users_per_item_block - 1))
    with caplog.at_level(logging.WARNING, logger="mf_spark"):
        ImplicitALS(rank=4, maxIter=1, numUserBlocks=2, numItemBlocks=3, broadcastThreshold=0).fit(ratings)
    warnings = [r.getMessage() for r in caplog.records if "gathers the factors" in r.getMessage()]
    assert warnings == [f"solving one item block gathers the factors of up to {users_per_item_block} users (0.0 GiB "
                        "at rank 4) in one task, and its Python worker needs about 2.3 times that: give executors "
                        "the memory (spark.executor.pyspark.memory or spark.executor.memoryOverhead) or raise "
                        "numItemBlocks (docs/als.md, \"Blocks and tasks\")"]
    assert items_per_user_block < users_per_item_block  # so the user blocks' figure stays under the limit
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mf_spark"):  # broadcast: nothing is gathered by routing
        ImplicitALS(rank=4, maxIter=1, numUserBlocks=2, numItemBlocks=3).fit(ratings)
    assert not [r for r in caplog.records if "gathers the factors" in r.getMessage()]


def test_a_fit_whose_factors_stop_being_finite_fails_naming_the_cause(spark, small):
    """One rating of 1e19 (within float32's range, so accepted) overflowed CG's float32 residual: a NaN
    item factor, every user left at its random start, loss=nan on each line, and a model that still
    recommended. The fit now stops; Cholesky (float64) trains the same data."""
    from mf_spark.errors import ConfigError

    R = small[0].copy()
    user, item = np.argwhere(R > 0)[0]
    R[user, item] = 1e19
    ratings = to_frame(spark, R)
    kw = dict(rank=4, maxIter=2, alpha=10.0, seed=1, numUserBlocks=2, numItemBlocks=2)
    persisted_before = set(spark.sparkContext._jsc.getPersistentRDDs().keySet())
    with pytest.raises(ConfigError, match=r"^ImplicitALS diverged in iteration 1: the new item factors are not "
                                          r"finite \(alpha = 10, .*: solver 'cg' works in float32, .* use solver "
                                          r"'cholesky'"):
        ImplicitALS(solver="cg", **kw).fit(ratings)
    assert set(spark.sparkContext._jsc.getPersistentRDDs().keySet()) <= persisted_before
    model = ImplicitALS(solver="cholesky", **kw).fit(ratings)
    assert np.all(np.isfinite(model.trainingLoss))


def test_final_storage_level_none_keeps_the_factors_out_of_the_dataframe_cache(spark, small):
    """Each fit persists its factor tables as DataFrames (finalStorageLevel), which stay in Spark's cache
    manager until unpersisted: a CrossValidator kept two per dropped model for the session. With
    finalStorageLevel="NONE" nothing enters that cache; the tables read the fit's last RDDs, persisted
    as RDDs like MLlib's, which Spark's cleaner may free once nothing references them (docs/als.md).
    (Whether the JVM collects them within a test's time is up to its GC: a test that waited for it
    passed alone and failed in the full suite.)"""
    from pyspark import StorageLevel

    R, ratings = small
    kw = dict(rank=3, maxIter=2, numUserBlocks=2, numItemBlocks=2)
    cached = ImplicitALS(**kw).fit(ratings)
    assert cached.userFactors.storageLevel == StorageLevel.MEMORY_AND_DISK
    cached.userFactors.unpersist()
    cached.itemFactors.unpersist()
    for broadcast in cached.trainingBroadcasts:
        broadcast.destroy()
    sc = spark.sparkContext
    before = set(sc._jsc.getPersistentRDDs().keySet())
    model = ImplicitALS(finalStorageLevel="NONE", **kw).fit(ratings)
    assert model.userFactors.storageLevel == model.itemFactors.storageLevel == StorageLevel.NONE
    assert model.transform(ratings).where("prediction IS NULL").count() == 0
    assert len(set(sc._jsc.getPersistentRDDs().keySet()) - before) == 2  # the fit's last RDDs, one per side
