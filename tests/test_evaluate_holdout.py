"""evaluate_holdout end to end on tiny synthetic data: models side by side, tuning, report files."""

from __future__ import annotations

import dataclasses

import datetime as dt
import json
import os

import pytest

from mf_spark.errors import InputDataError
from mf_spark.evaluate import evaluate_holdout
from mf_spark.evaluate.report import summary_table
from mf_spark.evaluate.models import TrainParams, recommend_for_users
from mf_spark.evaluate.splits import make_split
from mf_spark.evaluate.tuning import candidate_params

TRAIN = {
    "rank": 4,
    "max_iter": 3,
    "reg_param": 0.05,
    "alpha": 5.0,
    "num_user_blocks": 2,
    "num_item_blocks": 2,
    "seed": 1,
    "checkpoint_interval": -1,
    "warm_start": True,
}


@pytest.fixture(scope="module")
def communities(spark):
    """60 users in four taste groups of 12 items each; popularity is flat across groups, so a
    factor model must beat most-popular. Each user has 8 of their group's items, dated in order."""
    rows = []
    base = dt.datetime(2024, 1, 1)
    for user in range(60):
        group = user % 4
        for j in range(8):
            item = group * 12 + (user * 5 + j * 7) % 12
            ts = base + dt.timedelta(hours=user + j * 24)
            rows.append((user, item, float(1 + (user + j) % 4), 1, ts, ts))
    df = spark.createDataFrame(
        rows,
        "user_idx int, item_idx int, strength float, n_events long, first_ts timestamp, last_ts timestamp",
    ).dropDuplicates(["user_idx", "item_idx"])
    return df.persist()


def scores_at(result: dict, model: str, metric: str) -> float:
    return result["models"][model]["metrics"][metric]


def test_models_side_by_side_and_report(communities, spark, tmp_path):
    models = ["implicit_als", "mllib_als", "popular", "random"]
    result = evaluate_holdout(
        spark,
        communities,
        split="user_temporal",
        test_fraction=0.25,
        ks=[5, 10],
        models=models,
        train_params=TRAIN,
        out_dir=str(tmp_path),
    )
    assert result["primary_model"] == "implicit_als"
    assert list(result["models"]) == models
    assert result["split"]["counts"]["test_users"] == 60
    for name, run in result["models"].items():
        assert run["metrics"]["n_users"] == 60, name
        assert set(run["metrics"]) >= {
            "ndcg@5",
            "recall@10",
            "capped_recall@10",
            "map@10",
            "coverage@10",
            "mrr@5",
        }
    scores = {name: run["metrics"]["ndcg@10"] for name, run in result["models"].items()}
    # within-group structure: a factor model finds it, popularity cannot
    assert scores["implicit_als"] > scores["popular"] + 0.1
    assert scores["mllib_als"] > scores["popular"] + 0.1
    assert len(result["models"]["implicit_als"]["training_loss"]) == 3
    mllib = result["models"]["mllib_als"]
    assert mllib["training_loss"] is None
    # scored with the same objective: after 3 iterations from a different start, the same ballpark
    ours = result["models"]["implicit_als"]["training_loss"][-1]
    assert 0.5 * ours < mllib["final_loss"] < 2.0 * ours

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) >= {"split", "data", "ks", "models", "tuning", "primary_model", "plots"}
    assert written["models"]["implicit_als"]["params"]["rank"] == 4
    assert written["data"]["users"] == 60
    for plot in ("metric_vs_k.png", "training_loss.png"):
        assert (tmp_path / plot).stat().st_size > 5000
    report = (tmp_path / "report.md").read_text()
    assert "## Results at K = 10" in report and "| mllib_als |" in report
    assert "MLlib ALS does not expose a training loss; the same objective on its final factors" in report

    # every other model against the primary one, user by user, with an interval over the test users
    assert result["models"]["implicit_als"]["primary_minus_model"] is None
    for name in ("mllib_als", "popular", "random"):
        differences = result["models"][name]["primary_minus_model"]
        assert list(differences) == ["ndcg@5", "recall@5", "ndcg@10", "recall@10"]
        for metric, d in differences.items():
            gap = scores_at(result, "implicit_als", metric) - scores_at(result, name, metric)
            assert d["mean"] == pytest.approx(gap, abs=1e-12) and d["n_users"] == 60
            assert d["low"] <= d["mean"] <= d["high"]
    assert result["models"]["random"]["primary_minus_model"]["ndcg@10"]["low"] > 0  # far above chance
    assert "## implicit_als minus each other model" in report and "| random | +" in report
    printed = summary_table(result, 10)  # what jobs/evaluate.py prints
    assert "implicit_als minus model, ndcg@10 [95%]" in printed
    assert f"{result['models']['random']['primary_minus_model']['ndcg@10']['mean']:+.4f} [" in printed


def test_baselines_alone_get_no_empty_plots(communities, spark, tmp_path):
    """Without a factor model training_loss.png was empty axes, linked from report.md."""
    source = {"interactions": "/out/runs/dt=2024-01-02/run_id=r/interactions", "git_commit": "abc123",
              "versions": {"pyspark": "4.3.0"}, "argv": ["jobs/evaluate.py", "--date", "2024-01-02"],
              "host": "h1", "experiment": "ablation"}
    evaluate_holdout(spark, communities, split="user_random", test_fraction=0.25, ks=[5],
                     models=["popular", "random"], train_params=TRAIN, out_dir=str(tmp_path), source=source)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["metric_vs_k.png"]
    report = (tmp_path / "report.md").read_text()
    assert "metric_vs_k.png" in report and "training_loss.png" not in report
    # a standalone evaluation's report said nothing of what it evaluated
    assert json.loads((tmp_path / "metrics.json").read_text())["source"] == source
    assert ("Evaluated: interactions `/out/runs/dt=2024-01-02/run_id=r/interactions`, git_commit `abc123`, "
            "experiment `ablation`, command `jobs/evaluate.py --date 2024-01-02`\n") in report  # versions, host: json


def test_a_report_replaces_its_directory_whole(communities, spark, tmp_path, monkeypatch):
    """The report's files were written one by one into the directory: a failure halfway left a new
    metrics.json beside the old report.md, and a rerun kept an earlier run's tuning plot."""
    from mf_spark.errors import UsageError
    from mf_spark.evaluate import report as report_module

    out = tmp_path / "report"
    result = evaluate_holdout(spark, communities, split="user_random", test_fraction=0.25, ks=[5],
                              models=["popular", "random"], train_params=TRAIN, out_dir=str(out))
    (out / "tuning_metric_vs_rank.png").write_bytes(b"an earlier run's plot")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(_):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(report_module, "render_markdown", fail)
    changed = {**result, "models": {"popular": result["models"]["popular"]}}
    with pytest.raises(RuntimeError, match="injected failure"):
        report_module.write_report(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging directory left
    monkeypatch.undo()
    report_module.write_report(changed, out)
    assert sorted(p.name for p in out.iterdir()) == ["metric_vs_k.png", "metrics.json", "report.md"]

    report_module.check_report_dir(out)  # an earlier report: fine to replace
    report_module.check_report_dir(tmp_path / "new")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds files other than an evaluation report \(notes\.txt, report\)"):
        report_module.check_report_dir(tmp_path)
    # the library call deleted such a directory's files: refused before any work, and by write_report
    import mf_spark.evaluate.holdout as holdout_module

    def no_work(*args, **kwargs):
        raise AssertionError("the split was made before out_dir was checked")

    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(UsageError, match="holds files other than an evaluation report"):
        patch.setattr(holdout_module, "make_split", no_work)
        evaluate_holdout(spark, communities, split="user_random", test_fraction=0.25, ks=[5],
                         models=["popular"], train_params=TRAIN, out_dir=str(tmp_path))
    with pytest.raises(UsageError, match="holds files other than an evaluation report"):
        report_module.write_report(changed, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_no_training_items_in_any_list(communities):
    split = make_split(communities, "user_random", test_fraction=0.25, seed=3)
    users = split.test.select("user_idx").distinct()
    params = TrainParams.from_mapping(TRAIN)
    # one factor model suffices: every factor model shares the scoring path; baselines are tested with them
    for model in ("mllib_als",):
        recs = recommend_for_users(model, split.train, users, 10, params).recommendations
        leaked = recs.join(split.train, ["user_idx", "item_idx"], "left_semi").count()
        assert leaked == 0, model
        assert recs.join(split.train.select("item_idx").distinct(), "item_idx", "left_anti").count() == 0, (
            model
        )


def test_strong_generalization_folds_users_in(communities, spark):
    result = evaluate_holdout(
        spark,
        communities,
        split="strong_generalization",
        holdout_users=12,
        test_fraction=0.25,
        ks=[5],
        models=["implicit_als", "popular"],
        train_params=TRAIN,
    )
    counts = result["split"]["counts"]
    assert counts["test_users"] == 12 and counts["fold_in_interactions"] > 0
    metrics = {n: r["metrics"] for n, r in result["models"].items()}
    assert all(m["n_users"] == 12 for m in metrics.values())
    assert metrics["implicit_als"]["recall@5"] > metrics["popular"]["recall@5"]


def test_a_split_with_no_training_part_is_refused_with_its_settings(communities, spark):
    """A cutoff before every interaction (e.g. a fixed date the data's window has passed) leaves nothing
    to train on: the message names the split and its setting, not a numpy error from the solver."""
    from mf_spark.errors import InputDataError

    with pytest.raises(InputDataError, match="global_temporal split .cutoff_date=2019-12-31. left no training"):
        evaluate_holdout(spark, communities, split="global_temporal", cutoff_date="2019-12-31", ks=[5],
                         models=["implicit_als", "popular"], train_params=TRAIN)


def test_several_rows_per_pair_are_refused(communities, spark):
    """An external table with a pair twice: one row could land in train and one in test, where the
    seen-item exclusion made the test row unwinnable (recall 0 for a model that got it right)."""
    from mf_spark.errors import InputDataError

    doubled = communities.unionByName(communities.limit(1))
    with pytest.raises(InputDataError, match="one row per pair"):
        evaluate_holdout(spark, doubled, split="user_random", ks=[5], models=["popular"], train_params=TRAIN)


def test_tuning_mode_picks_on_validation(communities, spark, tmp_path):
    result = evaluate_holdout(
        spark,
        communities,
        split="user_random",
        test_fraction=0.25,
        ks=[5],
        models=["implicit_als", "popular"],
        train_params={**TRAIN, "max_iter": 2},
        tune=True,
        tuning_grid={"rank": [4], "regularization": ["count", "frequency"], "frequency_nu": [0.5]},
        tuning_metric="ndcg@5",
        out_dir=str(tmp_path),
    )
    tuning = result["tuning"]
    assert tuning["enabled"] and tuning["validation_counts"]["test_users"] > 0
    assert tuning["trials"] == {"implicit_als": 2}
    ials = result["models"]["implicit_als"]
    assert [(t["params"]["regularization"], t["params"]["frequency_nu"]) for t in ials["tuning_trials"]] == [
        ("count", None),
        ("frequency", 0.5),
    ]
    assert result["models"]["popular"]["tuning_trials"] is None
    best = max(ials["tuning_trials"], key=lambda t: t["value"])
    assert ials["params"]["regularization"] == best["params"]["regularization"]
    assert (tmp_path / "tuning_metric_vs_rank.png").stat().st_size > 5000
    report = (tmp_path / "report.md").read_text()
    assert "## Tuning" in report and "| frequency_nu |" in report
    assert report.count("| yes |") == 1  # the set the test metrics are for


def test_tuning_on_several_validation_splits_scores_their_mean(communities):
    from mf_spark.evaluate.tuning import tune_model, validation_splits

    split = make_split(communities, "user_random", test_fraction=0.25, seed=7)
    validations = validation_splits(split, 2, test_fraction=0.25, seed=7)
    assert len(validations) == 2
    first, second = (sorted(map(tuple, v.test.select("user_idx", "item_idx").collect())) for v in validations)
    assert first != second  # the two splits hold out different interactions
    base = TrainParams.from_mapping({**TRAIN, "max_iter": 2})
    grid = {"rank": [2, 4]}
    both = tune_model("implicit_als", validations, base, grid, metric="ndcg@5")
    singles = [tune_model("implicit_als", v, base, grid, metric="ndcg@5") for v in validations]
    for trial, one, two in zip(both.trials, singles[0].trials, singles[1].trials, strict=True):
        assert trial["values"] == pytest.approx([one["value"], two["value"]])
        assert trial["value"] == pytest.approx((one["value"] + two["value"]) / 2)
    # a temporal split's validation part does not depend on the seed: one split, not copies
    temporal = make_split(communities, "user_temporal", test_fraction=0.25)
    assert len(validation_splits(temporal, 3, test_fraction=0.25)) == 1
    # a validation split without users: every score was NaN and the first set "won"
    empty = dataclasses.replace(validations[1], test=validations[1].test.limit(0))
    with pytest.raises(InputDataError, match="tuning: validation split 2 of 2 has no user to score"):
        tune_model("implicit_als", [validations[0], empty], base, grid, metric="ndcg@5")


def driver_temp_files(spark) -> set[str]:
    """PySpark's driver files: one per broadcast, deleted only by ``destroy()`` or the session's end."""
    return set(os.listdir(spark.sparkContext._temp_dir))


@pytest.mark.parametrize("model", ["implicit_als", "mllib_als"])
def test_release_frees_what_a_fit_left_cached(communities, spark, model):
    """A tuning run fits hundreds of models: each must leave no persisted RDD behind, and no broadcast:
    each kept a driver temp file (the item factors, up to broadcast_max_mb) until the session ended."""
    from mf_spark.evaluate.metrics import per_user_metrics, ranking_metrics

    split = make_split(communities, "user_random", test_fraction=0.25, seed=7)
    split.train.persist().count()

    def persistent():
        return set(spark.sparkContext._jsc.getPersistentRDDs().keySet())

    before, files_before = persistent(), driver_temp_files(spark)
    users = split.relevant.select("user_idx").distinct()
    run = recommend_for_users(model, split.train, users, 5, TrainParams.from_mapping(TRAIN))
    ranking_metrics(run.recommendations, split.relevant, [5])
    assert persistent() - before  # the fitted factors are cached
    assert driver_temp_files(spark) - files_before  # the scoring (and ImplicitALS's fit) broadcast
    # the caller's own cache made from the lists (the primary model's per-user table) is spared, and so
    # are the broadcasts: every job reading that cache serialises the lists' lineage, broadcasts included
    before_mine = persistent()
    per_user = per_user_metrics(run.recommendations, split.relevant, [5]).persist()
    rows = sorted(per_user.collect())
    mine = frozenset(persistent() - before_mine)
    assert len(mine) == 1
    lingering = run.release(keep=mine)
    # compared as "what is new since before": an earlier test's orphaned caches may be cleaned meanwhile
    assert persistent() - before == mine
    assert lingering and sorted(per_user.collect()) == rows
    per_user.unpersist()
    assert persistent() - before == set()
    for broadcast in lingering:
        broadcast.destroy()
    assert driver_temp_files(spark) - files_before == set()
    # without a kept cache, release destroys them itself
    run = recommend_for_users(model, split.train, users, 5, TrainParams.from_mapping(TRAIN))
    ranking_metrics(run.recommendations, split.relevant, [5])
    assert run.release() == []
    assert persistent() - before == set() and driver_temp_files(spark) - files_before == set()
    split.train.unpersist()


def test_release_destroys_the_baselines_broadcasts(communities, spark):
    from mf_spark.evaluate.metrics import ranking_metrics

    split = make_split(communities, "user_random", test_fraction=0.25, seed=7)
    users = split.relevant.select("user_idx").distinct()
    for model in ("popular", "random"):
        files_before = driver_temp_files(spark)
        run = recommend_for_users(model, split.train, users, 5, TrainParams.from_mapping(TRAIN))
        ranking_metrics(run.recommendations, split.relevant, [5])
        assert driver_temp_files(spark) - files_before, model  # the catalogue is broadcast
        run.release()
        assert driver_temp_files(spark) - files_before == set(), model


def test_random_search_is_seeded():
    grid = {"rank": [8, 16, 32], "alpha": [1.0, 10.0, 40.0], "reg_param": [0.01, 0.1]}
    base = TrainParams()
    first = candidate_params(base, grid, model="implicit_als", mode="random", samples=5, seed=3)
    assert first == candidate_params(base, grid, model="implicit_als", mode="random", samples=5, seed=3)
    assert len(first) == 5 and len(set(first)) == 5
    assert len(candidate_params(base, grid, model="implicit_als")) == 18
    modes = {
        "rank": [8],
        "regularization": ["count", "constant", "frequency"],
        "confidence": ["linear", "log"],
    }
    assert len(candidate_params(base, modes, model="implicit_als")) == 6
    mllib = candidate_params(base, modes, model="mllib_als")
    assert len(mllib) == 2 and {p.regularization for p in mllib} == {"count"}, "MLlib has count scaling only"
    assert {p.solver for p in candidate_params(base, modes, model="implicit_als_cholesky")} == {"cholesky"}
    with pytest.raises(ValueError, match="max_iter"):
        candidate_params(base, {"max_iter": [1]}, model="implicit_als")


def test_frequency_dimensions_are_searched_only_where_they_act():
    base = TrainParams()
    grid = {
        "rank": [8, 16],
        "regularization": ["count", "frequency"],
        "frequency_alpha0": [0.01, 0.1],
        "frequency_nu": [0.5, 1.0],
    }
    ials = candidate_params(base, grid, model="implicit_als")
    # count: one set per rank (alpha0 and nu keep the base values); frequency: 2 x 2 per rank
    assert len(ials) == 2 * (1 + 4) and len(set(ials)) == len(ials)
    count = [p for p in ials if p.regularization == "count"]
    unused = {(p.frequency_alpha0, p.frequency_nu) for p in count}
    assert unused == {(base.frequency_alpha0, base.frequency_nu)}
    frequency = {(p.frequency_alpha0, p.frequency_nu) for p in ials if p.regularization == "frequency"}
    assert frequency == {(0.01, 0.5), (0.01, 1.0), (0.1, 0.5), (0.1, 1.0)}
    # MLlib cannot vary them (nor the regularisation): only the ranks remain
    mllib = candidate_params(base, grid, model="mllib_als")
    assert [(p.rank, p.regularization, p.frequency_alpha0) for p in mllib] == [
        (8, "count", base.frequency_alpha0),
        (16, "count", base.frequency_alpha0),
    ]
    # random mode draws from the distinct sets, so the budget is never spent on repeated fits
    drawn = candidate_params(base, grid, model="implicit_als", mode="random", samples=9, seed=0)
    assert len(drawn) == 9 and len(set(drawn)) == 9 and set(drawn) <= set(ials)
    assert candidate_params(base, grid, model="implicit_als", mode="random", samples=50) == ials
    # with frequency as the base regularisation the dimensions act without listing the mode
    freq_base = base.replace(regularization="frequency")
    assert len(candidate_params(freq_base, {"frequency_nu": [0.5, 1.0]}, model="implicit_als")) == 2


def test_trial_params_blank_inactive_frequency_settings():
    from mf_spark.evaluate.tuning import TUNABLE, trial_params

    count = trial_params(TrainParams(regularization="count"))
    assert list(count) == list(TUNABLE)
    assert count["frequency_alpha0"] is None and count["frequency_nu"] is None
    freq = trial_params(TrainParams(regularization="frequency", frequency_alpha0=0.02, frequency_nu=0.5))
    assert (freq["frequency_alpha0"], freq["frequency_nu"]) == (0.02, 0.5)


def test_neighbours_are_one_grid_step_away():
    from mf_spark.evaluate.tuning import neighbours, search_space

    grid = {
        "rank": [8, 16, 32],
        "reg_param": [0.1, 0.01, 1.0],  # ordered by value, not by listing
        "regularization": ["count", "frequency"],
        "frequency_nu": [0.5, 1.0],
    }
    base = TrainParams()
    space = search_space(base, grid, model="implicit_als")
    start = base.replace(rank=16, reg_param=0.1, solver="cg")
    near = {
        (p.rank, p.reg_param, p.regularization, p.frequency_nu)
        for p in neighbours(start, space, grid, model="implicit_als")
    }
    assert near == {
        (8, 0.1, "count", base.frequency_nu),
        (32, 0.1, "count", base.frequency_nu),
        (16, 0.01, "count", base.frequency_nu),
        (16, 1.0, "count", base.frequency_nu),
        (16, 0.1, "frequency", 0.5),  # switching on frequency reaches every nu
        (16, 0.1, "frequency", 1.0),
    }


def test_refine_search_climbs_to_the_best_within_the_budget():
    import math

    from mf_spark.evaluate.tuning import search, search_space

    grid = {
        "rank": [8, 16, 32, 64, 128],
        "reg_param": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        "alpha": [0.3, 1.0, 3.0, 10.0],
        "regularization": ["count", "frequency"],
        "frequency_nu": [0.5, 0.75, 1.0],
    }
    base = TrainParams()
    space = search_space(base, grid, model="implicit_als")
    assert len(space) == 5 * 6 * 4 * (1 + 3)

    def score(p):  # a single smooth peak at rank 32, reg_param 0.3, alpha 3, frequency nu 0.75
        nu = p.frequency_nu if p.regularization == "frequency" else 2.0
        distance = abs(math.log2(p.rank / 32)) + abs(math.log10(p.reg_param / 0.3))
        return -distance - abs(math.log10(p.alpha / 3)) - abs(nu - 0.75)

    results = search(base, grid, score, model="implicit_als", mode="refine", samples=30, seed=7)
    assert len(results) == 30 and len({p for p, _, _ in results}) == 30
    from mf_spark.evaluate.tuning import planned_trials  # the N of the "trial i/N" progress lines

    for mode, samples, model, n in (("refine", 30, "implicit_als", 30), ("random", 30, "implicit_als", 30),
                                    ("grid", 30, "implicit_als", len(space)), ("grid", 30, "mllib_als", 5 * 6 * 4)):
        assert planned_trials(base, grid, model=model, mode=mode, samples=samples, seed=7) == n
        if mode != "grid" or model == "mllib_als":
            assert len(search(base, grid, score, model=model, mode=mode, samples=samples, seed=7)) == n
    assert [stage for _, _, stage in results] == ["random"] * 15 + ["local"] * 15
    best = max(results, key=lambda r: r[1])[0]
    found = (best.rank, best.reg_param, best.alpha, best.regularization, best.frequency_nu)
    assert found == (32, 0.3, 3.0, "frequency", 0.75)
    assert results == search(base, grid, score, model="implicit_als", mode="refine", samples=30, seed=7)
    random_only = search(base, grid, score, model="implicit_als", mode="random", samples=30, seed=7)
    assert max(v for _, v, _ in random_only) < max(v for _, v, _ in results)
    # the budget is the same for every model; a space smaller than it is searched whole
    mllib = search(base, grid, score, model="mllib_als", mode="refine", samples=30, seed=7)
    assert len(mllib) == 30 and {p.regularization for p, _, _ in mllib} == {"count"}
    small = {"rank": [8, 16], "alpha": [1.0, 3.0]}
    assert len(search(base, small, score, model="mllib_als", mode="refine", samples=30)) == 4
    with pytest.raises(ValueError, match="tuning mode"):
        search(base, small, score, model="mllib_als", mode="bayes")


def test_cover_search_scores_mllibs_part_of_the_grid_first():
    from mf_spark.evaluate.tuning import search, search_space

    grid = {
        "rank": [8, 16, 32],
        "reg_param": [0.1, 1.0],
        "alpha": [1.0, 3.0],
        "regularization": ["count", "frequency"],
        "frequency_nu": [0.5, 1.0],
    }
    base = TrainParams()
    mllib_space = search_space(base, grid, model="mllib_als")
    start = candidate_params(base, grid, model="implicit_als", mode="cover", samples=20)
    # the same models MLlib trains, in its grid order, as ImplicitALS trains them
    assert [(p.rank, p.reg_param, p.alpha, p.regularization) for p in start] == [
        (p.rank, p.reg_param, p.alpha, p.regularization) for p in mllib_space
    ]
    assert {p.solver for p in start} == {"cg"}
    assert set(start) <= set(search_space(base, grid, model="implicit_als"))
    assert candidate_params(base, grid, model="mllib_als", mode="cover", samples=20) == mllib_space
    drawn = candidate_params(base, grid, model="implicit_als", mode="cover", samples=5, seed=1)
    assert len(drawn) == 5 and set(drawn) <= set(start)

    def score(p):  # best at rank 16 with frequency regularisation, which MLlib cannot reach
        return -abs(p.rank - 16) - (0 if p.regularization == "frequency" else 1) - p.reg_param

    results = search(base, grid, score, model="implicit_als", mode="cover", samples=18, seed=3)
    assert [stage for _, _, stage in results] == ["cover"] * 12 + ["local"] * 6
    from mf_spark.evaluate.tuning import planned_trials

    assert planned_trials(base, grid, model="implicit_als", mode="cover", samples=18, seed=3) == 18
    assert planned_trials(base, grid, model="mllib_als", mode="cover", samples=18, seed=3) == len(mllib_space)
    assert [p for p, _, _ in results[:12]] == start
    assert len({p for p, _, _ in results}) == 18
    best = max(results, key=lambda r: r[1])[0]
    assert (best.rank, best.reg_param, best.regularization) == (16, 0.1, "frequency")
    assert results == search(base, grid, score, model="implicit_als", mode="cover", samples=18, seed=3)
    # MLlib's cover search is its whole grid
    mllib = search(base, grid, score, model="mllib_als", mode="cover", samples=18, seed=3)
    assert [p for p, _, _ in mllib] == mllib_space


def test_tuning_budget_per_model(communities, spark):
    train_params = {**TRAIN, "max_iter": 2}
    result = evaluate_holdout(
        spark,
        communities,
        split="user_random",
        models=["implicit_als", "mllib_als", "implicit_als_cholesky"],
        train_params=train_params,
        ks=[5],
        tune=True,
        tuning_grid={"rank": [2, 4], "reg_param": [0.1, 1.0], "regularization": ["count", "frequency"]},
        tuning_metric="ndcg@5",
        tuning_mode="cover",
        tuning_samples={"implicit_als": 6, "mllib_als": 3},
    )
    assert result["tuning"]["trials"] == {"implicit_als": 6, "mllib_als": 3}
    assert result["tuning"]["samples"] == {"implicit_als": 6, "mllib_als": 3}
    stages = [t["stage"] for t in result["models"]["implicit_als"]["tuning_trials"]]
    assert stages == ["cover"] * 4 + ["local"] * 2
    chosen = {m: dict(result["models"][m]["params"]) for m in ("implicit_als", "implicit_als_cholesky")}
    assert chosen["implicit_als"].pop("solver") == "cg"
    assert chosen["implicit_als_cholesky"].pop("solver") == "cholesky"
    assert chosen["implicit_als"] == chosen["implicit_als_cholesky"]
    with pytest.raises(ValueError, match="no budget for 'mllib_als'"):
        evaluate_holdout(
            spark,
            communities,
            split="user_random",
            models=["mllib_als"],
            train_params=train_params,
            ks=[5],
            tune=True,
            tuning_grid={"rank": [2, 4]},
            tuning_samples={"implicit_als": 6},
        )


def test_mllib_gets_implicit_als_confidence_for_negative_strengths_under_log(spark):
    """log1p(r / eps) was null for a return (r <= -eps), which MLlib refuses, and the wrong size above -eps."""
    import math

    from pyspark.sql import functions as F

    from mf_spark.evaluate.models import _mllib_ratings

    params = TrainParams(rank=2, max_iter=2, alpha=10.0, confidence="log", confidence_epsilon=1.0,
                         num_user_blocks=1, num_item_blocks=1, checkpoint_interval=0)
    strengths = [-2.0, -0.5, 0.5, 3.0]
    train = spark.createDataFrame([(0, i, s) for i, s in enumerate(strengths)] + [(1, 0, 1.0), (1, 1, 2.0)],
                                  "user_idx int, item_idx int, strength float")
    fed = {r.item_idx: r.strength for r in _mllib_ratings(train, params).where(F.col("user_idx") == 0).collect()}
    for i, s in enumerate(strengths):  # MLlib: c = 1 + alpha*|r|, p = [r > 0]
        assert 1 + params.alpha * abs(fed[i]) == pytest.approx(1 + params.alpha * math.log1p(abs(s)))
        assert (fed[i] > 0) == (s > 0)
    # and MLlib trains on them (also with checkpoint_interval 0, which MLlib refuses as such)
    assert params.als_params()["checkpointInterval"] == -1
    users = spark.createDataFrame([(0,), (1,)], "user_idx int")
    run = recommend_for_users("mllib_als", train, users, 2, params, mllib_loss=False)
    assert run.recommendations.count() > 0


def test_mllib_loss_is_skipped_when_its_item_factors_are_too_large_to_collect(spark, monkeypatch, caplog):
    """The objective collects every item factor to the driver (about three copies) with no size guard."""
    from mf_spark.als import train as als_train
    from mf_spark.evaluate.models import TrainParams, mllib_objective

    train = spark.createDataFrame([(0, 0, 1.0), (0, 1, 2.0), (1, 1, 1.0)], "user_idx int, item_idx int, strength float")
    params = TrainParams(rank=2, max_iter=2)
    run = recommend_for_users("mllib_als", train, train.select("user_idx").distinct(), 2, params, mllib_loss=False)
    users, items = run.cached  # the fitted factor tables
    assert mllib_objective(train, users, items, params) > 0
    monkeypatch.setattr(als_train, "OBJECTIVE_MAX_ITEM_BYTES", 2 * 2 * 4 - 1)  # two items at rank 2: 16 bytes
    assert mllib_objective(train, users, items, params) is None
    assert "MLlib's final loss is not computed" in caplog.text
    run.release()
