"""Hyperparameter search per model on a validation split carved from the training part.

The test part is never looked at while choosing: candidates are trained on the validation split's
training part, ranked by one metric on its held-out part, and only the winner is then trained on the
whole training part and scored on the test part. Every factor model gets the same search, so the
comparison with MLlib is fair (MLlib searches over the dimensions it supports).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mf_spark.evaluate.metrics import parse_metric_name, ranking_metrics
from mf_spark.evaluate.models import ALS_MODELS, TrainParams, params_for_model, recommend_for_users
from mf_spark.evaluate.splits import Split, make_split

log = logging.getLogger(__name__)

TUNABLE = ("rank", "reg_param", "alpha", "regularization", "confidence")
# dimensions a model cannot vary; searching them would only repeat identical fits
UNSUPPORTED = {"mllib_als": ("regularization",)}


@dataclass
class TuningResult:
    """Trials in the order run (``params`` changed from the base, ``value`` of the metric) and the winner."""

    model: str
    metric: str
    best: TrainParams
    best_value: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def candidate_params(
    base: TrainParams,
    grid: Mapping[str, Sequence[Any]],
    *,
    model: str,
    mode: str = "grid",
    samples: int = 8,
    seed: int = 0,
) -> list[TrainParams]:
    """Parameter sets to try for ``model``.

    Parameters
    ----------
    grid
        ``name -> values`` for names in :data:`TUNABLE`; a missing or empty entry keeps the base value.
    mode
        ``grid``: every combination (sorted, deterministic); ``random``: ``samples`` distinct
        combinations drawn with ``random.Random(seed)`` from the full grid.
    """
    unknown = set(grid) - set(TUNABLE)
    if unknown:
        raise ValueError(f"cannot tune {', '.join(sorted(unknown))}; tunable: {', '.join(TUNABLE)}")
    skipped = UNSUPPORTED.get(model, ())
    names = [n for n in TUNABLE if grid.get(n) and n not in skipped]
    combos = list(itertools.product(*[list(dict.fromkeys(grid[n])) for n in names]))
    if mode == "random":
        if samples < len(combos):
            combos = random.Random(seed).sample(combos, samples)
    elif mode != "grid":
        raise ValueError(f"tuning mode must be grid or random, got {mode!r}")
    result, seen = [], set()
    for combo in combos:
        params = params_for_model(model, base.replace(**dict(zip(names, combo, strict=True))))
        if params not in seen:
            seen.add(params)
            result.append(params)
    return result


def validation_split(
    split: Split, *, test_fraction: float = 0.2, holdout_users: int = 100, seed: int = 7
) -> Split:
    """Carve a validation split from ``split.train`` with the matching per-user protocol.

    The global temporal split becomes a per-user temporal one (the same "predict the future" question
    without a second cutoff to choose); strong generalisation holds out other users of the training part.
    """
    protocol = {"global_temporal": "user_temporal"}.get(split.protocol, split.protocol)
    test_n = int(split.settings.get("test_n", 0) or 0)
    return make_split(
        split.train,
        protocol,
        test_fraction=test_fraction,
        test_n=test_n,
        holdout_users=holdout_users,
        seed=seed + 1,
    )


def tune_model(
    model: str,
    validation: Split,
    base: TrainParams,
    grid: Mapping[str, Sequence[Any]],
    *,
    metric: str = "ndcg@20",
    mode: str = "grid",
    samples: int = 8,
    seed: int = 0,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> TuningResult:
    """Try each candidate of :func:`candidate_params` on ``validation`` and keep the best by ``metric``.

    Ties keep the earlier candidate. ``on_trial`` is called with each finished trial (for logging).
    """
    if model not in ALS_MODELS:
        raise ValueError(f"only factor models are tuned ({', '.join(ALS_MODELS)}), not {model!r}")
    name, k = parse_metric_name(metric)
    candidates = candidate_params(base, grid, model=model, mode=mode, samples=samples, seed=seed)
    users = validation.relevant.select("user_idx").distinct()
    trials: list[dict[str, Any]] = []
    best, best_value = candidates[0], float("-inf")
    for params in candidates:
        run = recommend_for_users(
            model, validation.train, users, k, params, fold_in=validation.fold_in, mllib_loss=False
        )
        value = ranking_metrics(run.recommendations, validation.relevant, [k])[metric]
        trial = {
            "params": {n: getattr(params, n) for n in TUNABLE},
            "value": value,
            "fit_seconds": run.fit_seconds,
            "final_loss": run.final_loss,
        }
        trials.append(trial)
        log.info("tuning %s: %s = %.5f with %s", model, metric, value, trial["params"])
        if on_trial:
            on_trial(trial)
        if value > best_value:
            best, best_value = params, value
    return TuningResult(model, metric, best, best_value, trials)
