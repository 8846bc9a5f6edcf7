"""jobs/evaluate.py's checks that run before Spark starts, and where it reads and writes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from mf_spark.config import validate
from mf_spark.errors import ConfigError, InputDataError
from mf_spark.evaluate.holdout import published_interactions_path, report_dir, validate_settings
from tests.conftest import REPO_ROOT


def _evaluate(**overrides):
    raw = {"input": {"path": "x"}, "output": {"root": "y"}, "evaluate": overrides}
    return validate(raw)["evaluate"]


def test_defaults_are_valid():
    validate_settings(_evaluate(), tune=True)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"models": ["implicit_als", "lightfm"]}, "evaluate.models"),
        ({"gate": {"metric": "ndcg@30"}}, "evaluate.gate.metric"),
        ({"gate": {"metric": "auc@20"}}, "evaluate.gate.metric"),
        ({"split": "global_temporal"}, "evaluate.cutoff_date"),
        ({"cutoff_date": "2024-13-01"}, "evaluate.cutoff_date"),
        ({"cutoff_date": "2024-W48"}, "evaluate.cutoff_date"),  # an ISO week date: was 2024-11-25
        ({"tuning": {"confidence": ["linear", "sqrt"]}}, "evaluate.tuning.confidence"),
        ({"tuning": {"alpha": [1, "x"]}}, "evaluate.tuning.alpha"),
        ({"tuning": {"frequency_nu": [0.5, -1.0]}}, "evaluate.tuning.frequency_nu"),
        ({"tuning": {"frequency_alpha0": ["x"]}}, "evaluate.tuning.frequency_alpha0"),
        ({"tuning": {"reg_param": [-0.1]}}, "evaluate.tuning.reg_param"),
        ({"tuning": {"rank": [0, 8]}}, "evaluate.tuning.rank"),
        # tuning never computes the list-wide metrics: a KeyError after the first fit
        ({"tuning": {"metric": "coverage@20"}}, "evaluate.tuning.metric"),
        # tuning's validation split is per user with this fraction even when the test split is global
        ({"split": "global_temporal", "cutoff_date": "2024-01-01", "test_fraction": 1.0}, "evaluate.test_fraction"),
        # ...and test_n does not stand in for it there: the validation split then failed after Spark started
        ({"split": "global_temporal", "cutoff_date": "2024-01-01", "test_fraction": 1.0, "test_n": 2},
         "evaluate.test_fraction"),
        # one result per name: the second fit overwrote the first, the primary was compared with itself
        ({"models": ["popular", "implicit_als", "popular"]}, "evaluate.models"),
        # results are keyed "ndcg@20": a gate on "ndcg@020" failed after the whole nightly had run
        ({"gate": {"metric": "ndcg@020"}}, "evaluate.gate.metric"),
        ({"tuning": {"metric": "ndcg@010"}}, "evaluate.tuning.metric"),
    ],
)
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_settings(_evaluate(**overrides), tune=True)


def test_frequency_tuning_values_accepted():
    settings = _evaluate(
        tuning={
            "regularization": ["count", "frequency"],
            "frequency_alpha0": [0.01, 0.1],
            "frequency_nu": [1],
        }
    )
    assert settings["tuning"]["frequency_nu"] == [1.0]
    validate_settings(settings, tune=True)


def test_tuning_metric_checked_only_when_tuning():
    settings = _evaluate(tuning={"metric": "nope@1"})
    validate_settings(settings, tune=False)
    with pytest.raises(ConfigError, match="evaluate.tuning.metric"):
        validate_settings(settings, tune=True)


def test_missing_published_run_suggests_interactions(tmp_path):
    with pytest.raises(InputDataError, match="--interactions"):
        published_interactions_path(str(tmp_path), dt.date(2024, 1, 2))


def _published_run(root, run_date):
    from mf_spark.publish import begin_run, publish_run

    run = begin_run(str(root), run_date)
    Path(run.sub("interactions")).mkdir()
    publish_run(run, {})
    return run


def test_published_run_of_a_date_is_found_after_a_rollback_to_an_earlier_date(tmp_path):
    from mf_spark.publish import rollback

    first = _published_run(tmp_path, dt.date(2011, 12, 8))
    second = _published_run(tmp_path, dt.date(2011, 12, 9))
    rerun = _published_run(tmp_path, dt.date(2011, 12, 9))  # supersedes `second`
    rollback(str(tmp_path), "2011-12-08")
    # latest.json now names 12-08, but the 12-09 rerun is still published: evaluate it, not the
    # superseded first run of 12-09 (the old lookup said "no run published for 2011-12-09")
    assert published_interactions_path(str(tmp_path), dt.date(2011, 12, 9)) == rerun.sub("interactions")
    assert published_interactions_path(str(tmp_path), dt.date(2011, 12, 8)) == first.sub("interactions")
    from mf_spark.publish import run_status

    assert run_status(second) == "superseded" and run_status(rerun) == "published"  # the case described
    with pytest.raises(InputDataError, match="no run published for 2011-12-10"):
        published_interactions_path(str(tmp_path), dt.date(2011, 12, 10))


def test_report_dir_is_per_date(tmp_path):
    path = report_dir(str(tmp_path), dt.date(2024, 1, 2))
    assert path.startswith(str(tmp_path / "evaluations" / "dt=2024-01-02"))
    # two evaluations started in the same second wrote into one directory
    assert len({report_dir(str(tmp_path), dt.date(2024, 1, 2)) for _ in range(20)}) == 20


def test_job_rejects_bad_gate_metric_before_spark(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[input]\npath = "x"\n[output]\nroot = "y"\n[evaluate]\nks = [10]\n')
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "jobs" / "evaluate.py"),
            "--config",
            str(config),
            "--date",
            "2024-01-02",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "evaluate.gate.metric" in done.stderr and "Traceback" not in done.stderr


def test_job_refuses_an_out_directory_holding_other_files_before_spark(tmp_path):
    """The report replaces its directory whole: --out pointing at a directory of other files is refused."""
    config = tmp_path / "c.toml"
    config.write_text('[input]\npath = "x"\n[output]\nroot = "y"\n')
    (tmp_path / "keep.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--config", str(config), "--date", "2024-01-02",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "holds files other than an evaluation report (c.toml, keep.txt)" in done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "keep.txt").exists()
