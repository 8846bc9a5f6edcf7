"""benchmarks/quality.py's reuse of MLlib's result from an earlier run: only the same experiment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import main, reuse_baseline, tuning_budget, tuning_fit_seconds  # noqa: E402


def _run(mllib: bool) -> dict:
    tuning = {
        "grid": {"rank": [8, 16]},
        "metric": "ndcg@20",
        "validation_protocol": "user_random",
        "validation_splits": 3,
        "validation_counts": {"train_interactions": 10},
        "samples": {"implicit_als": 3, "mllib_als": 2},
        "trials": {"implicit_als": 3},
    }
    trial = {"value": 0.1, "fit_seconds": 2.0}
    models = {
        "implicit_als": {"tuning_trials": [{**trial, "params": {"rank": r}} for r in (8, 16, 32)]},
        "implicit_als_cholesky": {"tuning_trials": []},
        "popular": {"metrics": {"ndcg@20": 0.09}, "tuning_trials": None},
    }
    if mllib:
        models["mllib_als"] = {"tuning_trials": [{**trial, "params": {"rank": r}} for r in (8, 16)]}
        tuning["trials"]["mllib_als"] = 2
    return {
        "created_at": "2026-11-27T15:00:00+00:00",
        "split": {"protocol": "user_random", "settings": {"seed": 7}, "counts": {"test_users": 5}},
        "tuning": tuning,
        "models": models,
    }


def test_reuse_baseline_takes_mllibs_result_in_model_order():
    result, earlier = _run(mllib=False), _run(mllib=True)
    reuse_baseline(result, earlier)
    assert list(result["models"]) == ["implicit_als", "implicit_als_cholesky", "mllib_als", "popular"]
    assert result["models"]["mllib_als"] == earlier["models"]["mllib_als"]
    assert result["tuning"]["trials"] == {"implicit_als": 3, "mllib_als": 2}
    assert result["tuning"]["reused"] == {"mllib_als": "2026-11-27T15:00:00+00:00"}
    assert tuning_fit_seconds(result) == {"implicit_als": 6.0, "mllib_als": 4.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["split"]["settings"].update(seed=8), "split differs"),
        (lambda r: r["tuning"].update(validation_splits=1), "tuning.validation_splits differs"),
        (lambda r: r["tuning"]["grid"].update(rank=[8]), "tuning.grid differs"),
        (lambda r: r["models"]["popular"]["metrics"].update({"ndcg@20": 0.2}), "most-popular"),
        (lambda r: r["tuning"]["samples"].update(mllib_als=60), "tried 2 parameter sets there, not 60"),
    ],
)
def test_reuse_baseline_refuses_another_experiment(change, message):
    result, earlier = _run(mllib=False), _run(mllib=True)
    change(result)
    with pytest.raises(ValueError, match=message):
        reuse_baseline(result, earlier)
    assert "mllib_als" not in result["models"]


def test_budget_rules():
    assert tuning_budget("lastfm-2k", "trials", None) == ("refine", 60)
    assert tuning_budget("lastfm-2k", "compute", None) == ("cover", {"implicit_als": 90, "mllib_als": 60})
    assert tuning_budget("ml-latest-small", "compute", 10) == ("cover", {"implicit_als": 15, "mllib_als": 10})


def test_reuse_baseline_reads_runs_from_before_several_validation_splits():
    result, earlier = _run(mllib=False), _run(mllib=True)
    result["tuning"]["validation_splits"] = 1
    del earlier["tuning"]["validation_splits"], earlier["tuning"]["validation_counts"]
    reuse_baseline(result, earlier)
    assert "mllib_als" in result["models"]
    result, earlier = _run(mllib=False), _run(mllib=True)
    del earlier["tuning"]["validation_splits"]  # such a run had one validation split, this one three
    with pytest.raises(ValueError, match="tuning.validation_splits differs"):
        reuse_baseline(result, earlier)


def test_baselines_from_is_refused_before_any_spark_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the trials rule searches MLlib differently
        main(["--dataset", "lastfm-2k", "--baselines-from", str(tmp_path / "run.json")])
    assert exit_info.value.code == 2
    assert "--baselines-from needs --budget compute" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert main(["--dataset", "lastfm-2k", "--budget", "compute", "--baselines-from", str(missing)]) == 2
    assert f"--baselines-from {missing}" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main(["--dataset", "lastfm-2k", "--budget", "compute", "--baselines-from", str(broken)]) == 2
    assert f"--baselines-from {broken}" in capsys.readouterr().err
