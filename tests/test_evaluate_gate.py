"""Quality gate: minimum value, relative drop against the previous run, no previous run."""

from __future__ import annotations

import pytest

from mf_spark.errors import QualityGateError
from mf_spark.evaluate import check_gate, evaluate_gate, metric_value


def _result(ndcg20: float, model: str = "implicit_als") -> dict:
    return {
        "primary_model": model,
        "models": {
            model: {"metrics": {"ndcg@20": ndcg20, "recall@20": 0.3}},
            "popular": {"metrics": {"ndcg@20": 0.9}},
        },
    }


def test_reads_the_primary_model():
    assert metric_value(_result(0.25), "ndcg@20") == 0.25
    assert metric_value({"ndcg@20": 0.5}, "ndcg@20") == 0.5
    assert metric_value(None, "ndcg@20") is None


def test_minimum_value():
    failed = evaluate_gate(_result(0.04), None, "ndcg@20", min_value=0.05, max_relative_drop=0.5)
    assert not failed.passed and "below the minimum" in failed.reason and "ndcg@20" in failed.reason
    assert evaluate_gate(_result(0.05), None, "ndcg@20", min_value=0.05, max_relative_drop=0.5).passed


def test_no_previous_run_checks_only_the_minimum():
    result = evaluate_gate(_result(0.2), None, "ndcg@20", min_value=0.0, max_relative_drop=0.0)
    assert result.passed and "no previous run" in result.reason and result.previous_value is None
    # a previous manifest without the metric (e.g. evaluation was off) is the same as none
    assert evaluate_gate(_result(0.2), {"status": "published"}, "ndcg@20", 0.0, 0.0).passed


def test_relative_drop():
    previous = _result(0.20)
    ok = evaluate_gate(_result(0.15), previous, "ndcg@20", min_value=0.0, max_relative_drop=0.25)
    assert ok.passed and ok.previous_value == 0.20
    dropped = evaluate_gate(_result(0.14), previous, "ndcg@20", min_value=0.0, max_relative_drop=0.25)
    assert not dropped.passed and "dropped 30.0%" in dropped.reason
    assert evaluate_gate(_result(0.5), previous, "ndcg@20", min_value=0.0, max_relative_drop=0.0).passed
    assert evaluate_gate(_result(0.1), _result(0.0), "ndcg@20", min_value=0.0, max_relative_drop=0.0).passed


def test_unknown_metric_and_raising_helper():
    with pytest.raises(QualityGateError, match="evaluate.ks"):
        evaluate_gate(_result(0.2), None, "ndcg@50", 0.0, 0.5)
    with pytest.raises(QualityGateError, match="below the minimum") as info:
        check_gate(_result(0.01), None, "ndcg@20", min_value=0.1, max_relative_drop=0.5)
    assert info.value.exit_code == 5
    assert check_gate(_result(0.3), _result(0.3), "ndcg@20", 0.1, 0.5).passed


def test_a_nan_metric_fails_the_gate():
    # NaN < minimum and the drop check are both false, so a NaN passed the gate
    result = evaluate_gate(_result(float("nan")), _result(0.2), "ndcg@20", min_value=0.05, max_relative_drop=0.1)
    assert not result.passed and "NaN" in result.reason


def test_a_previous_run_measured_differently_is_compared_like_with_like(caplog):
    """The gate read each result's own primary model and never looked at the split: a run on another
    split, with popular as its primary model, passed a drop check against implicit_als's value."""
    def measured(ndcg20, model="implicit_als", protocol="user_random", fraction=0.2, users=9):
        result = {"primary_model": model, "models": {model: {"metrics": {"ndcg@20": ndcg20}}}}
        result["split"] = {"protocol": protocol, "settings": {"test_fraction": fraction}, "counts": {"users": users}}
        return result

    previous = measured(0.30)
    previous["models"]["popular"] = {"metrics": {"ndcg@20": 0.10}}
    # same split, primary model changed: compared with the previous run's value of the same model
    assert evaluate_gate(measured(0.09, "popular"), previous, "ndcg@20", 0.0, 0.5).previous_value == 0.10
    assert not evaluate_gate(measured(0.04, "popular"), previous, "ndcg@20", 0.0, 0.5).passed
    # another split (protocol or settings): not comparable, only the minimum is checked, with a warning
    other = evaluate_gate(measured(0.10, protocol="strong_generalization"), previous, "ndcg@20", 0.0, 0.5)
    assert other.passed and other.previous_value is None and "not comparable" in other.reason
    assert "another split" in caplog.text
    assert evaluate_gate(measured(0.10, fraction=0.3), previous, "ndcg@20", 0.0, 0.5).previous_value is None
    # the counts change every day and do not matter: still compared (were they, no drop would be caught)
    dropped = evaluate_gate(measured(0.10, users=10), previous, "ndcg@20", 0.0, 0.5)
    assert not dropped.passed and dropped.previous_value == 0.30 and "not comparable" not in dropped.reason


def test_a_standalone_evaluation_says_what_the_gate_minimum_would_say():
    """The evaluate job checked that the gate metric was evaluated but never said whether it met the minimum."""
    from mf_spark.evaluate.gate import minimum_check_line

    assert minimum_check_line(_result(0.2), "ndcg@20", 0.1) == (
        "the nightly's quality gate would pass its minimum: ndcg@20 = 0.20000 >= minimum 0.10000 "
        "(its drop check against the previous published run is not made here)")
    assert minimum_check_line(_result(0.04), "ndcg@20", 0.05).startswith(
        "the nightly's quality gate would fail its minimum: ndcg@20 = 0.04000 is below the minimum 0.05000")
