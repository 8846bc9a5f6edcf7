"""One evaluation run: split, (optionally) tune, fit every model, score, write the report."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pyspark import SparkContext, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mf_spark.config import parse_iso_date
from mf_spark.errors import InputDataError
from mf_spark.evaluate.metrics import (
    LIST_METRICS,
    METRICS,
    check_ks,
    item_popularity_percentile,
    metric_name,
    paired_differences,
    parse_metric_name,
    per_user_metrics,
    ranking_metrics,
)
from mf_spark.evaluate.models import ALS_MODELS, MODELS, TrainParams, persistent_rdd_ids, recommend_for_users
from mf_spark.evaluate.report import check_report_dir, write_report
from mf_spark.evaluate.splits import make_split
from mf_spark.evaluate.tuning import tune_model, validation_splits
from mf_spark.tables import INTERACTION_COLUMNS, require_columns

log = logging.getLogger(__name__)

DEFAULT_TUNING_GRID: dict[str, list[Any]] = {
    "rank": [32, 64],
    "reg_param": [0.01, 0.1],
    "alpha": [5.0, 20.0],
}


@contextmanager
def _job_description(sc: SparkContext, text: str) -> Iterator[None]:
    sc.setJobDescription(text)
    try:
        yield
    finally:
        sc.setJobDescription(None)


def evaluate_holdout(
    spark: SparkSession,
    interactions: DataFrame,
    *,
    split: str = "user_temporal",
    test_fraction: float = 0.2,
    test_n: int = 0,
    cutoff_date: str | dt.date | None = None,
    holdout_users: int = 100,
    seed: int = 7,
    train_params: Mapping[str, Any] | None = None,
    ks: Sequence[int] = (10, 20, 50, 100),
    models: Sequence[str] = ("implicit_als", "popular"),
    out_dir: str | None = None,
    tune: bool = False,
    tuning_grid: Mapping[str, Sequence[Any]] | None = None,
    tuning_metric: str = "ndcg@20",
    tuning_mode: str = "grid",
    tuning_samples: int | Mapping[str, int] = 8,
    tuning_validation_splits: int = 1,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` side by side on one holdout split of ``interactions``.

    Parameters
    ----------
    spark
        The session (the job's; used only to label the Spark jobs of this evaluation).
    interactions
        ``user_idx`` int, ``item_idx`` int, ``strength`` float, ``first_ts`` (or ``last_ts``) timestamp
        (temporal splits), one row per user-item pair.
    split, test_fraction, test_n, cutoff_date, holdout_users, seed
        The split protocol and its settings (see :mod:`mf_spark.evaluate.splits`).
    train_params
        Hyperparameters of the factor models, keys as in the ``[train]`` section (unknown keys ignored).
    ks
        Cut-offs of every metric.
    models
        Names from :data:`mf_spark.evaluate.models.MODELS`; the first is the *primary* model the gate reads.
    source
        What was evaluated (e.g. the interactions' path, the run, the command, the git commit; the
        evaluate job passes :func:`mf_spark.publish.provenance`), kept as the result's ``source``; its
        keys but versions, host, pid and start time are named at the top of ``report.md`` (a report
        outside a run directory says nothing of what it evaluated otherwise).
    out_dir
        When given, ``metrics.json``, ``report.md`` and plots are written there, replacing the directory
        whole: one holding anything but an earlier report, or that cannot be created or written, is
        refused before any work (UsageError).
    tune, tuning_grid, tuning_metric, tuning_mode, tuning_samples
        Tuning mode: each factor model searches the dimensions of ``tuning_grid`` it supports
        (``name -> values``; names from :data:`mf_spark.evaluate.tuning.TUNABLE`; default
        :data:`DEFAULT_TUNING_GRID`) on a validation split carved from the training part, chooses by
        ``tuning_metric`` and is then evaluated on the test part with the chosen parameters. In the
        random, refine and cover modes every search tries ``tuning_samples`` distinct parameter sets
        (fewer only when its space is smaller; ``tuning.trials`` records the count per search), or, when
        it maps model names to counts, its own count (an equal compute budget for models of unequal
        speed; both ImplicitALS solvers share the search of the first of them in ``models``).
    tuning_validation_splits
        Number of validation splits (seeds ``seed + 1``, ...) whose mean metric scores a parameter set;
        more than one makes the choice less dependent on one split (random and strong-generalisation
        protocols; a temporal split has one).

    Returns
    -------
    dict
        JSON-ready: ``primary_model``, ``ks``, ``split`` (protocol, settings, counts), ``data``,
        ``tuning``, and ``models -> name -> {metrics, params, training_loss, fit_seconds, tuning_trials}``.
    """
    if out_dir:
        check_report_dir(out_dir)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(
            f"models must be a non-empty list from {', '.join(MODELS)}; unknown: {', '.join(unknown)}"
        )
    ks = sorted(set(int(k) for k in ks))
    check_ks(ks)
    parse_metric_name(tuning_metric)
    require_columns(interactions, "interactions", INTERACTION_COLUMNS)  # the counts below failed with a trace
    base = TrainParams.from_mapping(train_params)
    models = list(models)
    # label this evaluation's Spark jobs; later jobs of the caller are not "evaluation"
    with _job_description(spark.sparkContext, "evaluation"):
        input_counts = _count_input(interactions)
        the_split = make_split(
            interactions,
            split,
            test_fraction=test_fraction,
            test_n=test_n,
            cutoff_date=cutoff_date,
            holdout_users=holdout_users,
            seed=seed,
        )
        # the split is deterministic, so caching is only for speed: a lost block is recomputed identically
        cached = [
            df.persist(StorageLevel.MEMORY_AND_DISK)
            for df in (the_split.train, the_split.test, the_split.fold_in)
            if df is not None
        ]
        counts = the_split.counts()
        log.info("split %s: %s", split, counts)
        if counts["train_interactions"] == 0:
            for df in cached:
                df.unpersist()
            settings = f"cutoff_date={cutoff_date}" if split == "global_temporal" else (
                f"holdout_users={holdout_users}" if split == "strong_generalization" else
                f"test_fraction={test_fraction}, test_n={test_n}")
            raise InputDataError(
                f"the {split} split ({settings}) left no training interactions out of "
                f"{input_counts['interactions']}; nothing to train on (check [evaluate] in the config)"
            )
        if counts["test_users"] == 0:
            log.warning("the %s split left no test users with history; every per-user metric is NaN (null in "
                        "metrics.json) and the gate fails", split)
        popularity = item_popularity_percentile(the_split.train).persist()
        catalogue_size = counts["train_items"]
        relevant = the_split.relevant
        test_users = relevant.select("user_idx").distinct()

        tuning_info: dict[str, Any] = {"enabled": bool(tune)}
        chosen: dict[str, TrainParams] = {}
        trials: dict[str, list[dict[str, Any]]] = {}
        if tune:
            validations = validation_splits(the_split, tuning_validation_splits, test_fraction=test_fraction,
                                            holdout_users=holdout_users, seed=seed)
            tuning_info, chosen, trials = _tune_models(
                models, validations, base, dict(tuning_grid or DEFAULT_TUNING_GRID), metric=tuning_metric,
                mode=tuning_mode, samples=tuning_samples, seed=seed,
            )

        runs: dict[str, Any] = {}
        # each model against the primary one, user by user: is a gap more than which users were drawn?
        compared = [metric_name(m, k) for k in ks for m in ("ndcg", "recall")]
        primary_per_user: DataFrame | None = None
        primary_broadcasts: list = []  # every read of primary_per_user serialises them: destroyed at the end
        for model in models:
            params = chosen.get(model, base)
            # in a nightly this fit's iteration lines follow the published model's: say which is which
            log.info("evaluation: %s on the %s split's training part (%d test users)", model, split,
                     counts["test_users"])
            run = recommend_for_users(
                model,
                the_split.train,
                test_users,
                ks[-1],
                params,
                fold_in=the_split.fold_in,
                random_seed=seed,
            )
            recs = run.recommendations.persist()
            per_user = per_user_metrics(recs, relevant, ks).persist()
            keep: frozenset[int] = frozenset()
            if primary_per_user is None:
                # run.release() frees every RDD persisted since the fit began: spare the primary model's
                # per-user table, which the other models' comparisons read (recomputing it would mean
                # scoring, possibly fitting, again). Its cache is the one RDD that counting it adds.
                recs.count()
                before = persistent_rdd_ids(spark)
                per_user.count()
                keep = persistent_rdd_ids(spark) - before
            metrics = ranking_metrics(
                recs, relevant, ks, popularity=popularity, catalogue_size=catalogue_size, per_user=per_user
            )
            differences = None
            if primary_per_user is None:
                primary_per_user = per_user
                cached.append(per_user)  # kept for the other models' comparisons, freed with the split
            else:
                differences = paired_differences(primary_per_user, per_user, compared)
                per_user.unpersist()
            recs.unpersist()
            primary_broadcasts += run.release(keep=keep)
            runs[model] = {
                "metrics": metrics,
                "primary_minus_model": differences,
                "params": run.params,
                "training_loss": run.training_loss,
                "final_loss": run.final_loss,
                "fit_seconds": round(run.fit_seconds, 3),
                "tuning_trials": trials.get(model),
            }
            log.info(
                "%s: %s",
                model,
                {k: round(v, 4) for k, v in metrics.items() if k.startswith(("ndcg@", "recall@"))},
            )

        for df in cached + [popularity]:
            df.unpersist()
        for broadcast in primary_broadcasts:
            broadcast.destroy()
        result: dict[str, Any] = {
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "primary_model": models[0],
            "ks": ks,
            "split": {"protocol": split, "settings": the_split.settings, "counts": counts},
            "data": {k: int(v) for k, v in input_counts.items()},
            "tuning": tuning_info,
            "models": runs,
        }
        if source:
            result["source"] = dict(source)
        if out_dir:
            write_report(result, out_dir)
        return result


def _count_input(interactions: DataFrame) -> dict[str, int]:
    """``interactions``, ``users`` and ``items`` of the input; raises InputDataError when a
    (user_idx, item_idx) pair has more than one row."""
    counts = (
        interactions.agg(
            F.count(F.lit(1)).alias("interactions"),
            F.count_distinct("user_idx").alias("users"),
            F.count_distinct("item_idx").alias("items"),
            F.count_distinct("user_idx", "item_idx").alias("pairs"),
        )
        .first()
        .asDict()
    )
    if counts.pop("pairs") < counts["interactions"]:
        # A pair in both parts is a seen item of its user, so its test row could never be a hit;
        # and rows equal in the split's order made the split depend on partitioning.
        raise InputDataError(
            f"interactions: {counts['interactions']} rows hold fewer distinct (user_idx, item_idx) "
            "pairs; the evaluation needs one row per pair, as the pipeline's interactions table has "
            "(aggregate the rows first)"
        )
    return counts


def _tune_models(
    models: Sequence[str],
    validations: Sequence[Any],
    base: TrainParams,
    grid: dict[str, Sequence[Any]],
    *,
    metric: str,
    mode: str,
    samples: int | Mapping[str, int],
    seed: int,
) -> tuple[dict[str, Any], dict[str, TrainParams], dict[str, list[dict[str, Any]]]]:
    """Search ``grid`` for each ALS model of ``models`` on the validation splits.

    Returns the ``tuning`` record of the result, the chosen parameters per model and the trials per model
    (both ImplicitALS solvers share one search: the same objective; the CG winner is reused for
    Cholesky, whose trials list is then empty).
    """
    validation_cached = [
        df.persist() for validation in validations
        for df in (validation.train, validation.test, validation.fold_in) if df is not None
    ]
    tuning_info: dict[str, Any] = {
        "enabled": True, "metric": metric, "mode": mode,
        "samples": samples if isinstance(samples, int) else dict(samples), "grid": grid,
        "validation_protocol": validations[0].protocol, "validation_splits": len(validations),
        "validation_counts": validations[0].counts(),
    }
    chosen: dict[str, TrainParams] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    tuned_once: dict[str, Any] = {}
    for model in models:
        if model not in ALS_MODELS:
            continue
        family = "implicit" if model.startswith("implicit_als") else model
        if family not in tuned_once:
            tuned_once[family] = tune_model(model, validations, base, grid, metric=metric, mode=mode,
                                            samples=_samples_for(model, samples), seed=seed)
        result = tuned_once[family]
        chosen[model] = result.best
        trials[model] = result.trials if result.model == model else []
    # the budget each search spent (random, refine: min(samples, distinct sets of its space))
    tuning_info["trials"] = {r.model: len(r.trials) for r in tuned_once.values()}
    if isinstance(samples, int) and len(set(tuning_info["trials"].values())) > 1:
        log.warning("the tuning searches tried different numbers of parameter sets: %s", tuning_info["trials"])
    for df in validation_cached:
        df.unpersist()
    return tuning_info, chosen, trials


def holdout_settings_from(cfg: Mapping[str, Any], *, tune: bool = False) -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate_holdout` that a validated config sets: ``[evaluate]``'s
    split and models, ``[train]`` as the models' parameters and, with ``tune``, ``[evaluate.tuning]``."""
    evaluate = cfg["evaluate"]
    settings: dict[str, Any] = {
        "split": evaluate["split"], "test_fraction": evaluate["test_fraction"], "test_n": evaluate["test_n"],
        "cutoff_date": evaluate["cutoff_date"], "holdout_users": evaluate["holdout_users"],
        "seed": evaluate["seed"], "ks": evaluate["ks"], "models": evaluate["models"], "train_params": cfg["train"],
    }
    if tune:
        from mf_spark.evaluate.tuning import TUNABLE

        tuning = evaluate["tuning"]
        settings.update(
            tune=True, tuning_grid={name: tuning[name] for name in TUNABLE}, tuning_metric=tuning["metric"],
            tuning_mode=tuning["mode"], tuning_samples=tuning["samples"],
            tuning_validation_splits=tuning["validation_splits"],
        )
    return settings


def validate_settings(evaluate: Mapping[str, Any], *, tune: bool = False) -> None:
    """Check the ``[evaluate]`` values that the schema cannot (before Spark starts).

    Raises
    ------
    ConfigError
        Naming the key: an unknown model or metric, a gate or tuning metric whose K is not evaluated,
        a test fraction outside (0, 1) where the split uses it, a global temporal split without
        ``cutoff_date``, an unknown regularisation or confidence to tune,
        a negative tuning value or a rank below 1.
    """
    from mf_spark.als.params import CONFIDENCES, REGULARIZATIONS
    from mf_spark.errors import ConfigError

    unknown = [m for m in evaluate["models"] if m not in MODELS]
    if unknown or not evaluate["models"]:
        raise ConfigError(f"key 'evaluate.models': {unknown or 'empty list'} not in {', '.join(MODELS)}")
    repeated = sorted({m for m in evaluate["models"] if evaluate["models"].count(m) > 1})
    if repeated:
        # one result per name: the second fit overwrote the first, and the primary was compared with itself
        raise ConfigError(f"key 'evaluate.models': {', '.join(repeated)} listed more than once")
    try:
        check_ks(evaluate["ks"])
    except ValueError as exc:
        raise ConfigError(f"key 'evaluate.ks': {exc}") from None
    metrics = [("evaluate.gate.metric", evaluate["gate"]["metric"])]
    if tune:
        metrics.append(("evaluate.tuning.metric", evaluate["tuning"]["metric"]))
    for key, name in metrics:
        try:
            metric, k = parse_metric_name(name)
        except ValueError as exc:
            raise ConfigError(f"key '{key}': {exc}") from None
        if name != metric_name(metric, k):  # results are keyed "ndcg@20": "ndcg@020" was never found
            raise ConfigError(f"key '{key}': write {metric_name(metric, k)!r}, not {name!r}")
        if key.startswith("evaluate.gate") and k not in evaluate["ks"]:
            raise ConfigError(f"key '{key}': K={k} of {name!r} is not in evaluate.ks {evaluate['ks']}")
        if key.startswith("evaluate.tuning") and metric in LIST_METRICS:
            # catalogue-wide, not a per-user ranking quality: tuning does not compute them (KeyError after a fit)
            raise ConfigError(f"key '{key}': {name!r} describes the lists, not their quality; tune on one of "
                              f"{', '.join(m for m in METRICS if m not in LIST_METRICS)}")
    # Tuning carves its validation split per user (global temporal becomes per-user temporal, with the
    # fraction whatever test_n says: test_n belongs to the per-user splits)
    fraction_used = (
        evaluate["split"] == "strong_generalization"
        or (evaluate["split"] == "global_temporal" and tune)
        or (evaluate["split"] != "global_temporal" and evaluate["test_n"] == 0)
    )
    if fraction_used and not 0 < evaluate["test_fraction"] < 1:
        test_n_hint = {"strong_generalization": "", "global_temporal": " for tuning"}.get(
            evaluate["split"], " (or evaluate.test_n > 0)")
        raise ConfigError(
            f"key 'evaluate.test_fraction': the {evaluate['split']} split needs a fraction strictly between "
            f"0 and 1{test_n_hint}, "
            f"got {evaluate['test_fraction']!r}"
        )
    if evaluate["split"] == "global_temporal" and not evaluate["cutoff_date"]:
        raise ConfigError("key 'evaluate.cutoff_date': the global_temporal split needs a date (YYYY-MM-DD)")
    if evaluate["cutoff_date"]:
        try:
            parse_iso_date(evaluate["cutoff_date"])
        except ValueError:
            raise ConfigError(
                f"key 'evaluate.cutoff_date': not a YYYY-MM-DD date: {evaluate['cutoff_date']!r}"
            ) from None
    for key, allowed in (("regularization", REGULARIZATIONS), ("confidence", CONFIDENCES)):
        bad = [v for v in evaluate["tuning"][key] if v not in allowed]
        if bad:
            raise ConfigError(f"key 'evaluate.tuning.{key}': {bad} not in {', '.join(allowed)}")
    for key in ("reg_param", "alpha", "frequency_alpha0", "frequency_nu"):
        bad = [v for v in evaluate["tuning"][key] if v < 0]
        if bad:
            raise ConfigError(f"key 'evaluate.tuning.{key}': negative values {bad}")
    if any(v < 1 for v in evaluate["tuning"]["rank"]):
        raise ConfigError(f"key 'evaluate.tuning.rank': ranks must be >= 1, got {evaluate['tuning']['rank']}")


def published_interactions_path(root: str, run_date: dt.date) -> str:
    """The ``interactions`` table of the run published for ``run_date`` under ``root``.

    That is the newest run of ``run_date`` whose status is ``published`` (not superseded), whether or
    not ``latest.json`` names it: a rollback to an earlier date does not hide it.

    Raises
    ------
    InputDataError
        When no published run has that date (names the root and the date, suggests --interactions).
    """
    import os

    from mf_spark import publish

    # Look the date up among the published runs rather than through previous_published: that one
    # answers "what to warm-start from", and after a rollback to an earlier date it returns the
    # rolled-back-to run, although the run of run_date is still published and evaluable.
    # Superseded runs are skipped: a newer run of the same date replaced them.
    published = [
        row for row in publish.list_runs(root)
        if row["run_date"] == run_date.isoformat() and row["status"] == "published"
    ]
    if not published:
        raise InputDataError(f"no run published for {run_date} under {root}; pass --interactions PATH")
    newest = max(published, key=lambda row: row["run_id"])  # run ids sort by start time
    path = os.path.join(root, newest["path"], "interactions")
    if not os.path.isdir(path):
        raise InputDataError(f"{path}: the published run has no interactions table; pass --interactions PATH")
    return path


def report_dir(root: str, run_date: dt.date) -> str:
    """``<root>/evaluations/dt=<date>/<run id>``: a new directory per evaluation, never overwritten (a
    run id as :func:`mf_spark.publish.new_run_id` makes them: a stamp to the second let two evaluations
    started in the same second share one)."""
    import os

    from mf_spark.publish import new_run_id

    return os.path.join(root, "evaluations", f"dt={run_date.isoformat()}", new_run_id())


def _samples_for(model: str, tuning_samples: int | Mapping[str, int]) -> int:
    if isinstance(tuning_samples, int):
        return tuning_samples
    if model not in tuning_samples:
        raise ValueError(f"tuning_samples names no budget for {model!r}: {dict(tuning_samples)}")
    return int(tuning_samples[model])
