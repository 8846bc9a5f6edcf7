"""Hyperparameter search per model on a validation split carved from the training part.

The test part is never looked at while choosing: candidates are trained on the validation split's
training part, ranked by one metric on its held-out part, and only the winner is then trained on the
whole training part and scored on the test part. Every factor model searches every dimension of the
grid it supports (MLlib: rank, reg_param, alpha, confidence; ImplicitALS also the regularisation mode and
the frequency regularisation's alpha0 and nu) and, in the random and refine modes, tries the same number
of distinct parameter sets, so the comparison with MLlib is fair.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mf_spark.evaluate.metrics import parse_metric_name, ranking_metrics
from mf_spark.evaluate.models import ALS_MODELS, TrainParams, params_for_model, recommend_for_users
from mf_spark.evaluate.splits import Split, make_split

log = logging.getLogger(__name__)

TUNABLE = (
    "rank",
    "reg_param",
    "alpha",
    "regularization",
    "confidence",
    "frequency_alpha0",
    "frequency_nu",
)
# dimensions a model cannot vary; searching them would only repeat identical fits
UNSUPPORTED = {"mllib_als": ("regularization", "frequency_alpha0", "frequency_nu")}
CATEGORICAL = ("regularization", "confidence")  # the other dimensions are numeric, ordered by value
MODES = ("grid", "random", "refine", "cover")
# the model whose space every factor model's space contains: "cover" searches its part first
BASELINE_MODEL = "mllib_als"
# dimensions that act only under one value of another; elsewhere they keep the base value
CONDITIONAL = {
    "frequency_alpha0": ("regularization", "frequency"),
    "frequency_nu": ("regularization", "frequency"),
}


@dataclass
class TuningResult:
    """Trials in the order run (``params`` changed from the base, ``value`` of the metric) and the winner."""

    model: str
    metric: str
    best: TrainParams
    best_value: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def search_space(base: TrainParams, grid: Mapping[str, Sequence[Any]], *, model: str) -> list[TrainParams]:
    """Every distinct parameter set of ``grid`` that ``model`` can train, in grid order.

    ``grid`` maps names in :data:`TUNABLE` to values; a missing or empty entry keeps the base value.
    Dimensions the model does not support (:data:`UNSUPPORTED`) are ignored, and those of
    :data:`CONDITIONAL` keep the base value where they have no effect (``frequency_alpha0`` and
    ``frequency_nu`` outside ``regularization = "frequency"``), so no two sets train the same model.
    """
    unknown = set(grid) - set(TUNABLE)
    if unknown:
        raise ValueError(f"cannot tune {', '.join(sorted(unknown))}; tunable: {', '.join(TUNABLE)}")
    names = _searched(grid, model)
    distinct: dict[TrainParams, None] = {}
    for combo in itertools.product(*[list(dict.fromkeys(grid[n])) for n in names]):
        params = params_for_model(model, base.replace(**dict(zip(names, combo, strict=True))))
        distinct.setdefault(_without_inactive(params, base), None)
    return list(distinct)


def candidate_params(
    base: TrainParams,
    grid: Mapping[str, Sequence[Any]],
    *,
    model: str,
    mode: str = "grid",
    samples: int = 8,
    seed: int = 0,
) -> list[TrainParams]:
    """Parameter sets to try for ``model`` up front (:func:`search_space` of ``grid``).

    Parameters
    ----------
    mode
        ``grid``: the whole space, in grid order; ``random``: ``samples`` of its distinct sets drawn with
        ``random.Random(seed)`` (all of them when there are fewer); ``refine``: the random start of the
        refine search, ``ceil(samples / 2)`` sets drawn the same way (:func:`search` adds the rest);
        ``cover``: every set of the space that MLlib ALS can also train (:data:`BASELINE_MODEL`: the
        rank x reg_param x alpha x confidence part, count regularisation), in grid order, as ``model``
        trains them; ``samples`` of them drawn as in ``random`` when there are more (:func:`search` adds
        refine steps over the whole space up to ``samples``).
    """
    if mode not in MODES:
        raise ValueError(f"tuning mode must be one of {', '.join(MODES)}, got {mode!r}")
    space = search_space(base, grid, model=model)
    if mode == "cover":
        # a model with more options than the baseline never knows less about the baseline's part
        members = set(space)
        start = [
            p
            for p in (
                _without_inactive(params_for_model(model, b), base)
                for b in search_space(base, grid, model=BASELINE_MODEL)
            )
            if p in members
        ]
        return random.Random(seed).sample(start, samples) if samples < len(start) else start
    wanted = {"grid": len(space), "random": samples, "refine": (samples + 1) // 2}[mode]
    if wanted < len(space):
        return random.Random(seed).sample(space, wanted)
    return space


def neighbours(
    params: TrainParams, space: Sequence[TrainParams], grid: Mapping[str, Sequence[Any]], *, model: str
) -> list[TrainParams]:
    """The sets of ``space`` one grid step from ``params``, in ``space`` order.

    One step: a numeric dimension moved to the next smaller or larger value of its grid, or a
    categorical one (``regularization``, ``confidence``) changed; switching to ``frequency``
    regularisation reaches every ``frequency_alpha0`` / ``frequency_nu`` pair (they were inactive).
    """
    return _one_step_away(params, space, grid, _searched(grid, model))


def _one_step_away(
    params: TrainParams, space: Sequence[TrainParams], grid: Mapping[str, Sequence[Any]], names: Sequence[str]
) -> list[TrainParams]:
    return [other for other in space if _steps(params, other, names, grid) == 1]


def _searched(grid: Mapping[str, Sequence[Any]], model: str) -> list[str]:
    skipped = UNSUPPORTED.get(model, ())
    return [n for n in TUNABLE if grid.get(n) and n not in skipped]


def _active(params: TrainParams, name: str) -> bool:
    if name not in CONDITIONAL:
        return True
    other, value = CONDITIONAL[name]
    return bool(getattr(params, other) == value)


def _steps(a: TrainParams, b: TrainParams, names: Sequence[str], grid: Mapping[str, Sequence[Any]]) -> int:
    steps = 0
    for name in names:
        va, vb = getattr(a, name), getattr(b, name)
        if va == vb or not (_active(a, name) and _active(b, name)):
            continue
        if name in CATEGORICAL:
            steps += 1
        else:
            values = sorted(set(grid[name]))
            steps += abs(values.index(va) - values.index(vb))
    return steps


def _without_inactive(params: TrainParams, base: TrainParams) -> TrainParams:
    """``params`` with the :data:`CONDITIONAL` dimensions that have no effect reset to ``base``."""
    inactive = {name: getattr(base, name) for name in CONDITIONAL if not _active(params, name)}
    return params.replace(**inactive) if inactive else params


def trial_params(params: TrainParams) -> dict[str, Any]:
    """The :data:`TUNABLE` values of ``params`` as a report shows them (``None`` where inactive)."""
    return {name: getattr(params, name) if _active(params, name) else None for name in TUNABLE}


def validation_splits(
    split: Split, count: int, *, test_fraction: float = 0.2, holdout_users: int = 100, seed: int = 7
) -> list[Split]:
    """``count`` validation splits carved from ``split.train`` by :func:`validation_split` called with
    seeds ``seed``, ``seed + 1``, ... (the first is the one split of ``count = 1``): different random
    holdouts (``user_random``) or held-out users (``strong_generalization``). A temporal split's
    validation part does not depend on the seed, so there it is one split whatever ``count`` is.
    """
    if count < 1:
        raise ValueError(f"need at least one validation split, got {count}")
    if split.protocol in ("user_temporal", "global_temporal") and count > 1:
        log.info("validation of a %s split is the same for every seed: tuning on one split", split.protocol)
        count = 1
    return [
        validation_split(split, test_fraction=test_fraction, holdout_users=holdout_users, seed=seed + i)
        for i in range(count)
    ]


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


def search(
    base: TrainParams,
    grid: Mapping[str, Sequence[Any]],
    score: Callable[[TrainParams], float],
    *,
    model: str,
    mode: str = "grid",
    samples: int = 8,
    seed: int = 0,
) -> list[tuple[TrainParams, float, str]]:
    """Score parameter sets of ``grid`` with ``score`` (higher is better): ``(params, value, stage)``s.

    ``grid`` and ``random`` score :func:`candidate_params`. ``refine`` spends the same budget,
    ``min(samples, size of the space)`` distinct sets: a seeded random start of half of it, then, one at a
    time, the first untried :func:`neighbours` of the best set so far (of the next best when all of its
    neighbours are tried; of a further seeded random set when every tried set's are), a deterministic
    hill climb that keeps a large space (ImplicitALS's regularisation modes) from being sampled thinly.
    ``cover`` starts from MLlib's part of the space instead of the random start and then takes the same
    steps: a model whose space contains MLlib's (ImplicitALS) scores everything MLlib's search scores
    before its own options. ``stage`` is ``grid``/``random``/``cover`` for the up-front sets and
    ``local`` for the refine steps.
    """
    results: list[tuple[TrainParams, float, str]] = []
    stage = {"refine": "random"}.get(mode, mode)
    for params in candidate_params(base, grid, model=model, mode=mode, samples=samples, seed=seed):
        results.append((params, score(params), stage))
    if mode not in ("refine", "cover"):
        return results
    space = search_space(base, grid, model=model)
    names = _searched(grid, model)
    fallback = random.Random(seed + 1).sample(space, len(space))
    came_from: dict[TrainParams, TrainParams] = {}
    while len(results) < min(samples, len(space)):
        tried = {params for params, _, _ in results}
        ranked = sorted(results, key=lambda r: -r[1])  # stable: ties keep the earlier set first
        following = (
            (near, params)
            for params, _, _ in ranked
            for near in _ordered_neighbours(params, came_from.get(params), space, grid, names)
            if near not in tried
        )
        step = next(following, None)
        if step is None:
            params = next(p for p in fallback if p not in tried)
        else:
            params, came_from[params] = step
        results.append((params, score(params), "local"))
    return results


def planned_trials(
    base: TrainParams, grid: Mapping[str, Sequence[Any]], *, model: str, mode: str, samples: int, seed: int
) -> int:
    """How many sets :func:`search` will score with these arguments (for progress lines)."""
    up_front = len(candidate_params(base, grid, model=model, mode=mode, samples=samples, seed=seed))
    if mode not in ("refine", "cover"):
        return up_front
    return max(up_front, min(samples, len(search_space(base, grid, model=model))))


def _ordered_neighbours(
    params: TrainParams,
    origin: TrainParams | None,
    space: Sequence[TrainParams],
    grid: Mapping[str, Sequence[Any]],
    names: Sequence[str],
) -> list[TrainParams]:
    """The neighbours of ``params`` in ``space`` order, except that when ``params`` was reached by a step
    from ``origin``, those one more step in the same direction come first (a climb keeps its way)."""
    near = _one_step_away(params, space, grid, names)
    if origin is not None:
        moved = _changed(origin, params, names)
        ahead = [
            n for n in near if _changed(params, n, names) == moved and _steps(origin, n, names, grid) == 2
        ]
        near = ahead + [n for n in near if n not in ahead]
    return near


def _changed(a: TrainParams, b: TrainParams, names: Sequence[str]) -> set[str]:
    return {n for n in names if getattr(a, n) != getattr(b, n) and _active(a, n) and _active(b, n)}


def tune_model(
    model: str,
    validation: Split | Sequence[Split],
    base: TrainParams,
    grid: Mapping[str, Sequence[Any]],
    *,
    metric: str = "ndcg@20",
    mode: str = "grid",
    samples: int = 8,
    seed: int = 0,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> TuningResult:
    """Run :func:`search` with ``metric`` on ``validation`` as the score and keep the best set.

    ``validation`` is one split or several (:func:`validation_splits`); with several, a set's score is
    the mean of ``metric`` over them, so the winner depends less on the luck of one split. Ties keep the
    earlier set. ``on_trial`` is called with each finished trial (for logging).
    """
    if model not in ALS_MODELS:
        raise ValueError(f"only factor models are tuned ({', '.join(ALS_MODELS)}), not {model!r}")
    _, k = parse_metric_name(metric)
    validations = [validation] if isinstance(validation, Split) else list(validation)
    if not validations:
        raise ValueError("tune_model needs at least one validation split")
    users = [v.relevant.select("user_idx").distinct() for v in validations]
    for number, split_users in enumerate(users, start=1):
        # Every score would be NaN, and max() would then "pick" whichever set came first
        if split_users.isEmpty():
            from mf_spark.errors import InputDataError

            raise InputDataError(f"tuning: validation split {number} of {len(users)} has no user to score (too "
                                 "little history per user in the training part); tune on more data")
    trials: list[dict[str, Any]] = []
    planned = planned_trials(base, grid, model=model, mode=mode, samples=samples, seed=seed)

    def score(params: TrainParams) -> float:
        started = time.perf_counter()
        values, fit_seconds, final_loss = [], 0.0, None
        for split, split_users in zip(validations, users, strict=True):
            run = recommend_for_users(
                model, split.train, split_users, k, params, fold_in=split.fold_in, mllib_loss=False
            )
            values.append(ranking_metrics(run.recommendations, split.relevant, [k])[metric])
            run.release()
            fit_seconds += run.fit_seconds
            final_loss = run.final_loss if final_loss is None else final_loss
        value = sum(values) / len(values)
        trial = {
            "params": trial_params(params),
            "value": value,
            "fit_seconds": fit_seconds,
            "final_loss": final_loss,
        }
        if len(values) > 1:
            trial["values"] = values
        trials.append(trial)
        # a real grid is 100+ fits: say how far along the search is
        log.info("tuning %s trial %d/%d: %s = %.5f with %s (%.1f s)", model, len(trials), planned, metric, value,
                 trial["params"], time.perf_counter() - started)
        if on_trial:
            on_trial(trial)
        return value

    results = search(base, grid, score, model=model, mode=mode, samples=samples, seed=seed)
    for trial, (_, _, stage) in zip(trials, results, strict=True):
        trial["stage"] = stage
    best, best_value = max(results, key=lambda r: r[1])[:2]  # max keeps the first of equal values
    return TuningResult(model, metric, best, best_value, trials)
