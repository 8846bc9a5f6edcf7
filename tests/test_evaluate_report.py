"""report.md and the plots read by a person: the verdict first, intervals that show their sign, the
chosen tuning trial marked. No Spark: a hand-made result in the shape evaluate_holdout returns."""

from __future__ import annotations

import copy

from mf_spark.evaluate.report import render_markdown, verdict_lines, write_report

KS = [10, 20]
METRICS = ("precision", "recall", "capped_recall", "map", "ndcg", "hit_rate", "mrr", "coverage", "popularity")


def _metrics(level: float) -> dict[str, float]:
    return {f"{m}@{k}": level * (1 + k / 100) for m in METRICS for k in KS} | {"n_users": 50}


def _difference(mean: float, low: float, high: float) -> dict[str, float]:
    return {"mean": mean, "low": low, "high": high, "n_users": 50}


PARAMS = {"rank": 32, "max_iter": 10, "reg_param": 0.1, "alpha": 10.0, "regularization": "count",
          "frequency_alpha0": 0.01, "frequency_nu": 1.0, "confidence": "linear", "solver": "cholesky",
          "cg_steps": 3}
TRIALS = [{"params": {"rank": r, "alpha": a}, "value": v, "fit_seconds": 1.0}
          for r, a, v in ((8, 1.0, 0.10), (16, 1.0, 0.12), (32, 1.0, 0.13), (32, 10.0, 0.13))]
RESULT = {
    "split": {"protocol": "user_random", "settings": {"test_fraction": 0.2, "test_n": 0, "seed": 42},
              "counts": {"test_users": 50, "cold_test_users": 0, "test_interactions_not_positive": 7}},
    "data": {"users": 60, "items": 40, "interactions": 900},
    "ks": KS,
    "primary_model": "implicit_als",
    "models": {
        "implicit_als": {"metrics": _metrics(0.20), "params": PARAMS, "fit_seconds": 2.0,
                         "training_loss": [900.0, 500.0, 480.0], "primary_minus_model": None,
                         "tuning_trials": TRIALS},
        "mllib_als": {"metrics": _metrics(0.19), "params": PARAMS, "fit_seconds": 3.0, "training_loss": None,
                      "final_loss": 470.0, "tuning_trials": None,
                      "primary_minus_model": {"ndcg@20": _difference(0.0025, -0.000033, 0.0047)}},
        "popular": {"metrics": _metrics(0.10), "params": {}, "fit_seconds": 0.1, "training_loss": None,
                    "tuning_trials": None,
                    "primary_minus_model": {"ndcg@20": _difference(0.1, 0.08, 0.12)}},
    },
    "tuning": {"enabled": True, "metric": "ndcg@20", "mode": "grid"},
    "source": {"interactions": "/data/x", "argv": ["jobs/evaluate.py", "--set", 'evaluate.models=["a","b"]']},
}


def test_the_report_opens_with_the_verdict_and_explains_its_columns():
    """report.md opened with a 500-character provenance line and a counts table; which model won, by how
    much and how surely came six sections later, and Pop. pct or Coverage were not explained."""
    report = render_markdown(copy.deepcopy(RESULT))
    assert "Split: **user_random** (test_fraction=0.2, seed=42)." in report  # test_n = 0: the fraction is used
    summary = report.index("## Summary")
    assert summary < report.index("## Data") < report.index("## Results at K = 10")
    assert ("- implicit_als vs mllib_als: NDCG@20 +0.0025 [-3.3e-05, +0.0047], +1.1% relative: no difference "
            "beyond user sampling (the interval holds 0).") in report
    assert "- implicit_als vs popular: NDCG@20 +0.1000 [+0.0800, +0.1200], +83.3% relative: ahead by more" in report
    assert report.index("K = 20\n\n| model |") > summary  # the table at K = 20, right under the verdicts
    assert "Pop. pct: mean popularity percentile" in report and "Coverage: share of the training items" in report
    assert "7 held-out rows have strength <= 0 (confident dislikes, e.g. returns): they are never counted" in report
    assert "- implicit_als: 3 iterations, loss 900 -> 480 (the last iteration changed it by -4.00%)" in report


def test_verdicts_say_behind_too_and_claim_nothing_from_one_user():
    result = copy.deepcopy(RESULT)
    result["models"]["mllib_als"]["primary_minus_model"]["ndcg@20"] = _difference(-0.01, -0.02, -0.001)
    assert verdict_lines(result)[0].endswith("behind by more than user sampling explains.")
    # one shared user: low = high = mean, which read as "ahead by more than user sampling explains"
    result["models"]["mllib_als"]["primary_minus_model"]["ndcg@20"] = {"mean": 0.5, "low": 0.5, "high": 0.5,
                                                                        "n_users": 1}
    assert verdict_lines(result)[0].endswith("one shared test user, so no interval to judge by.")


def test_tuning_table_marks_the_pick_and_the_grid_edge_and_mllib_ignores_the_solver():
    report = render_markdown(copy.deepcopy(RESULT))
    assert "| rank | alpha | validation ndcg@20 | fit s | chosen |" in report
    assert report.count("| yes |") == 1 and "| 32 | 1 | 0.1300 | 1.0 | yes |" in report  # the first of ties
    assert "Chosen at the edge of the values tried: rank 32 (the largest of 8, 16, 32)." in report
    assert "alpha 1 (" not in report  # two values tried: every pick is at an edge, no note
    mllib_row = next(line for line in report.splitlines() if line.startswith("| mllib_als | 32 |"))
    assert mllib_row.endswith("| linear | - | - | 3.0 |")  # MLlib has one exact solver: no solver, no CG steps


def test_the_command_can_be_pasted_back():
    report = render_markdown(copy.deepcopy(RESULT))
    assert "command `jobs/evaluate.py --set 'evaluate.models=[\"a\",\"b\"]'`" in report


def test_plots_are_written_for_a_hand_made_result(tmp_path):
    written = write_report(copy.deepcopy(RESULT), tmp_path / "report")
    for name in ("metric_vs_k.png", "training_loss.png", "tuning_metric_vs_rank.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000, written


def test_the_console_summary_ends_with_the_gate_minimum():
    from mf_spark.evaluate.report import console_summary

    printed = console_summary(copy.deepcopy(RESULT), "ndcg@20", 0.5)
    assert printed.startswith("K = 20\n| model |") and "- implicit_als vs mllib_als: NDCG@20" in printed
    assert printed.splitlines()[-1].startswith("the nightly's quality gate would fail its minimum: ndcg@20 = 0.24000")
    assert "quality gate" not in console_summary(copy.deepcopy(RESULT))
