"""Quality gate: a run may be published only if its evaluation is good enough.

Two checks on one metric of the primary model (the first model evaluated, normally ``implicit_als``):
an absolute minimum, and a maximum relative drop against the previous published run's value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from mf_spark.errors import QualityGateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """Outcome of the gate; ``reason`` is one sentence for the run manifest and the log."""

    passed: bool
    reason: str
    value: float | None = None
    previous_value: float | None = None


def metric_value(metrics: dict[str, Any] | None, metric: str, model: str | None = None) -> float | None:
    """``metric`` (e.g. ``"ndcg@20"``) of ``model`` (default: the primary model) in an
    :func:`evaluate_holdout` result, or None.

    A flat ``{"ndcg@20": ...}`` dict is accepted too.
    """
    if not metrics:
        return None
    if metric in metrics and isinstance(metrics[metric], (int, float)):
        return float(metrics[metric])
    primary = model or metrics.get("primary_model")
    value = metrics.get("models", {}).get(primary, {}).get("metrics", {}).get(metric)
    return None if value is None else float(value)


def split_change(metrics: dict[str, Any], previous_metrics: dict[str, Any] | None) -> str | None:
    """How the split of two :func:`evaluate_holdout` results differs (protocol or settings), or None
    when it is the same (or either result has no split: a flat dict).

    The data counts of the split change every day and are not compared."""
    if not previous_metrics or "split" not in metrics or "split" not in previous_metrics:
        return None
    changes = []
    split, previous_split = metrics.get("split") or {}, previous_metrics.get("split") or {}
    for key in ("protocol", "settings"):
        if split.get(key) != previous_split.get(key):
            changes.append(f"split {key} {previous_split.get(key)} -> {split.get(key)}")
    return "; ".join(changes) or None


def evaluate_gate(
    metrics: dict[str, Any],
    previous_metrics: dict[str, Any] | None,
    metric: str,
    min_value: float,
    max_relative_drop: float,
) -> GateResult:
    """Check ``metric`` against ``min_value`` and against the previous run.

    Parameters
    ----------
    metrics, previous_metrics
        Results of :func:`mf_spark.evaluate.evaluate_holdout` (``previous_metrics`` None, or without the
        metric, when there is no previous published run: only the minimum is checked). The previous
        value is that of this run's primary model, so a change of primary model compares like with
        like (and skips the drop check when the previous run did not evaluate it). A previous run on
        another split (:func:`split_change`) is not compared, with a warning: its value says nothing
        about a drop.
    metric
        ``name@K``, e.g. ``"ndcg@20"``.
    min_value
        The metric must be at least this.
    max_relative_drop
        ``(previous - current) / previous`` must not exceed this (checked when previous > 0).

    Raises
    ------
    QualityGateError
        When ``metric`` is not in ``metrics`` (a gate on a K that was not evaluated cannot pass).
    """
    value = metric_value(metrics, metric)
    if value is None:
        available = sorted(
            metrics.get("models", {}).get(metrics.get("primary_model"), {}).get("metrics") or {}
        )
        raise QualityGateError(
            f"gate metric {metric!r} was not computed (computed: {', '.join(available) or 'none'}); "
            "set evaluate.gate.metric to one of them or add its K to evaluate.ks"
        )
    previous = metric_value(previous_metrics, metric, model=metrics.get("primary_model"))
    change = split_change(metrics, previous_metrics)
    if change is not None and previous is not None:
        log.warning("quality gate: the previous run used another split (%s); %s is not compared with "
                    "its value %.5f", change, metric, previous)
        previous = None
    if math.isnan(value):  # every comparison with NaN is false: without this it passed both checks
        return GateResult(False, f"{metric} is NaN (no test user scored?)", value, previous)
    if value < min_value:
        return GateResult(
            False, f"{metric} = {value:.5f} is below the minimum {min_value:.5f}", value, previous
        )
    if previous is None:
        why = "no previous run to compare with" if change is None else f"previous run not comparable ({change})"
        return GateResult(True, f"{metric} = {value:.5f} >= minimum {min_value:.5f}; {why}", value, None)
    if previous > 0:
        drop = (previous - value) / previous
        if drop > max_relative_drop + 1e-12:  # 0.2 -> 0.15 is a 25% drop, not 25.000000000000006%
            return GateResult(
                False,
                f"{metric} = {value:.5f} dropped {drop:.1%} from the previous run's {previous:.5f} "
                f"(allowed: {max_relative_drop:.1%})",
                value,
                previous,
            )
    return GateResult(
        True,
        f"{metric} = {value:.5f} >= minimum {min_value:.5f}; previous run {previous:.5f}",
        value,
        previous,
    )


def check_gate(
    metrics: dict[str, Any],
    previous_metrics: dict[str, Any] | None,
    metric: str,
    min_value: float,
    max_relative_drop: float,
) -> GateResult:
    """:func:`evaluate_gate`, raising :class:`~mf_spark.errors.QualityGateError` when it fails."""
    result = evaluate_gate(metrics, previous_metrics, metric, min_value, max_relative_drop)
    if not result.passed:
        raise QualityGateError(f"quality gate failed: {result.reason}")
    log.info("quality gate passed: %s", result.reason)
    return result


def minimum_check_line(metrics: dict[str, Any], metric: str, min_value: float) -> str:
    """What the nightly's gate would say of a standalone evaluation: its minimum only (the drop check
    needs the previous published run, which a standalone evaluation is not compared with)."""
    result = evaluate_gate(metrics, None, metric, min_value, max_relative_drop=0.0)
    verdict = "would pass" if result.passed else "would fail"
    return (f"the nightly's quality gate {verdict} its minimum: {result.reason.split(';')[0]} "
            "(its drop check against the previous published run is not made here)")
