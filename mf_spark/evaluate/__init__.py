"""Offline evaluation: splits, ranking metrics, model comparison, tuning, report and quality gate.

Importing this package does not start Spark; the functions take DataFrames and plain values.
"""

from __future__ import annotations

from mf_spark.evaluate.gate import GateResult, check_gate, evaluate_gate, metric_value

__all__ = ["GateResult", "check_gate", "evaluate_gate", "evaluate_holdout", "metric_value"]


def __getattr__(name: str):  # lazy: the gate is usable without importing pyspark
    if name == "evaluate_holdout":
        from mf_spark.evaluate.holdout import evaluate_holdout

        return evaluate_holdout
    raise AttributeError(name)
