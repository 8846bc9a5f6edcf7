"""The nightly batch: ingest -> train -> recommend -> evaluate (gate) -> publish, one direction.

Library code: takes a session, the validated config and a date; the thin ``jobs/nightly.py`` parses
arguments and builds the session. Every run writes only inside its own run directory; a consumer sees
a run only after ``latest.json`` names it (:mod:`mf_spark.publish`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mf_spark import publish
from mf_spark.als.params import SolveParams
from mf_spark.config import key_source
from mf_spark.errors import (
    DAMAGED_FILE_MARKERS,
    InputDataError,
    NoInteractionsLeftError,
    OutOfSpaceError,
    PipelineError,
    QualityGateError,
    UsageError,
    damaged_file_cause,
    error_text,
    failing_file_or_cause,
    java_cause,
    out_of_space,
)
from mf_spark.session import spark_context_stopped

if TYPE_CHECKING:  # imported lazily at run time, as run_nightly does, to keep this module light
    from mf_spark.als.estimator import ImplicitALS
    from mf_spark.als.model import ImplicitALSModel
    from mf_spark.recommend import RecommendSettings

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s: start", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            log.info("stage %s: %.1fs", name, self.seconds[name])

    def table(self) -> str:
        width = max((len(n) for n in self.seconds), default=5)
        lines = [f"{'stage':<{width}}  seconds", f"{'-' * width}  -------"]
        lines += [f"{n:<{width}}  {s:7.1f}" for n, s in self.seconds.items()]
        lines.append(f"{'total':<{width}}  {sum(self.seconds.values()):7.1f}")
        return "\n".join(lines)


@dataclass
class NightlyResult:
    run_dir: str
    manifest: dict[str, Any]
    published: bool


def solve_params_from(train: dict[str, Any]) -> SolveParams:
    return SolveParams(
        alpha=train["alpha"], reg_param=train["reg_param"], regularization=train["regularization"],
        confidence=train["confidence"], confidence_epsilon=train["confidence_epsilon"],
        frequency_alpha0=train["frequency_alpha0"], frequency_nu=train["frequency_nu"], solver="cholesky",
    )


def recommend_settings_from(cfg: dict[str, Any]) -> RecommendSettings:
    """The validated ``[recommend]`` section (and the ``[train]`` settings fold-in solves with) as a
    :class:`~mf_spark.recommend.RecommendSettings`: what the nightly's recommend stage runs with."""
    from mf_spark.recommend import RecommendSettings

    rec = cfg["recommend"]
    return RecommendSettings(
        top_n=rec["top_n"], similar_n=rec["similar_n"], exclude_seen=rec["exclude_seen"],
        fold_in_new_users=rec["fold_in_new_users"], user_block_size=rec["user_block_size"],
        item_chunk_size=rec["item_chunk_size"], max_broadcast_bytes=rec["broadcast_max_mb"] * 2**20,
        solve_params=solve_params_from(cfg["train"]),
    )


def build_estimator(train: dict[str, Any], max_iter: int) -> ImplicitALS:
    from mf_spark import ImplicitALS

    return ImplicitALS(
        rank=train["rank"], maxIter=max_iter, regParam=train["reg_param"], alpha=train["alpha"],
        userCol="user_idx", itemCol="item_idx", ratingCol="strength", numUserBlocks=train["num_user_blocks"],
        numItemBlocks=train["num_item_blocks"], seed=train["seed"], checkpointInterval=train["checkpoint_interval"],
        solver=train["solver"], cgSteps=train["cg_steps"], regularization=train["regularization"],
        confidence=train["confidence"], confidenceEpsilon=train["confidence_epsilon"],
        frequencyAlpha0=train["frequency_alpha0"], frequencyNu=train["frequency_nu"],
    )


def load_warm_start(
    spark: SparkSession, root: str, rank: int, previous: dict[str, Any] | None
) -> tuple[ImplicitALSModel | None, dict[str, Any] | None]:
    """The factors of ``previous`` (a published run's manifest, the run's baseline from
    :func:`mf_spark.publish.previous_published`) as an ``ImplicitALSModel``, and ``previous`` itself;
    ``(None, None)`` for a cold start.

    Factor ids are ID-map indices, which never change meaning between runs, so yesterday's factors
    are valid starting points today. Factors that are missing, of another rank, or unreadable (a damaged
    file) give a cold start with a WARNING: they crashed every later nightly, since each picks the same
    baseline.
    """
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    from mf_spark.als.model import ImplicitALSModel

    if not previous:
        return None, None
    run_path = os.path.join(root, previous["run_path"]) if "run_path" in previous else previous.get("run_dir")
    if not run_path:
        return None, None
    users = os.path.join(run_path, "user_factors")
    items = os.path.join(run_path, "item_factors")
    if not (os.path.isdir(users) and os.path.isdir(items)):
        log.warning("previous run %s has no user_factors/ and item_factors/: cold start", run_path)
        return None, None
    prev_rank = previous.get("parameters", {}).get("train", {}).get("rank")
    if prev_rank is not None and prev_rank != rank:
        log.warning("previous run has rank %s, this run %s: cold start", prev_rank, rank)
        return None, None
    try:
        factors = {}
        for name, path in (("user", users), ("item", items)):
            factors[name] = spark.read.parquet(path).select("id", "features")
            # reads every page (a footer-only count would miss a damaged page) and checks the vectors;
            # size(NULL) is NULL under ANSI mode, so null vectors are counted on their own
            wrong = factors[name].where(F.col("features").isNull() | (F.size("features") != rank)).count()
            if wrong:
                log.warning("previous run's %s factors %s: %d vectors are null or not of rank %d: cold start",
                            name, path, wrong, rank)
                return None, None
    except (PySparkException, Py4JJavaError) as exc:
        # Only the files' fault falls back: a lost executor or a stopped context must fail the run, not
        # quietly change the published model to a cold start.
        if spark_context_stopped(spark) or not _unreadable_files(exc):
            raise
        log.warning("previous run's factors in %s cannot be read (%s): cold start; roll back or fix that "
                    "run to warm-start again", run_path, str(exc).strip().splitlines()[0][:300])
        return None, None
    model = ImplicitALSModel(rank=rank, userFactors=factors["user"], itemFactors=factors["item"])
    return model, previous


#: Conditions that mean a table's files are damaged or not the expected table (not a failure of the
#: cluster): the warm start then falls back to a cold start.
_UNREADABLE_FILE_MARKERS = (*DAMAGED_FILE_MARKERS, "PATH_NOT_FOUND", "UNABLE_TO_INFER_SCHEMA", "UNRESOLVED_COLUMN",
                            "DATATYPE_MISMATCH")


def _unreadable_files(exc: BaseException) -> bool:
    return damaged_file_cause(exc, _UNREADABLE_FILE_MARKERS) is not None


def output_counts(spark: SparkSession, run: publish.RunDir) -> tuple[dict[str, int], dict[str, int]]:
    """Rows of each written table, and how many of the model's users got a top-N list and items a
    similar-items list (counted in the same pass over each list table), the latter logged.

    Those left out (mostly an all-zero factor, i.e. no positive interaction in the window;
    docs/recommend.md) were visible only by comparing counts, and they need the serving fallback.
    """
    outputs = {name: spark.read.parquet(run.sub(name)).count()
               for name in ("interactions", "rejects", "user_factors", "item_factors")}
    with_lists = {}
    for table, key, name in (("recommendations", "user_id", "users_with_recommendations"),
                             ("similar_items", "item_id", "items_with_similar_items")):
        row = spark.read.parquet(run.sub(table)).agg(F.count(F.lit(1)), F.count_distinct(key)).first()
        outputs[table], with_lists[name] = int(row[0]), int(row[1])
    coverage = {"users": outputs["user_factors"], "items": outputs["item_factors"], **with_lists}
    log.info("recommend: %d of %d users got a list and %d of %d items a similar-items list (the others: no "
             "positive interaction in the window, docs/recommend.md; serve them a fallback)",
             coverage["users_with_recommendations"],
             coverage["users"], coverage["items_with_similar_items"], coverage["items"])
    return outputs, coverage


def _with_string_ids(factors: DataFrame, dim: DataFrame, idx_col: str, id_col: str) -> DataFrame:
    return factors.join(dim.select(F.col(idx_col).alias("id"), id_col), "id", "left").select("id", id_col, "features")


ITEM_TABLE_KEYS = ("item_filter_path", "allow_list_path")


def require_local_path(path: str | None, message: str) -> None:
    """Raise :class:`InputDataError` with ``message`` when ``path`` is a local path that does not exist.

    URIs (``s3a://...``, ``hdfs://...``) and an empty path are left to the readers: only Spark can see them.
    """
    if path and "://" not in path and not os.path.exists(path):
        raise InputDataError(message)


def check_local_inputs(cfg: dict[str, Any], *, events: bool = True, item_tables: bool = True) -> None:
    """Raise :class:`InputDataError` naming the key when a local input path in ``cfg`` does not exist.

    Jobs call this before Spark starts; URIs (``s3a://...``) are left to the readers.
    """
    keys = [("input", "path")] if events else []
    keys += [("recommend", key) for key in ITEM_TABLE_KEYS] if item_tables else []
    for section, key in keys:
        path = cfg[section][key]
        require_local_path(path, f"{section}.{key} = {path} does not exist ({key_source(cfg, f'{section}.{key}')})")


def check_before_writing(cfg: dict[str, Any], date: dt.date, *, break_stale_lock: bool = False,
                         item_tables: bool = True) -> None:
    """What the nightly and the ingest job check before Spark starts: the local inputs exist (exit 3),
    ``output.root`` can be written (exit 2) and no other run holds its lock (exit 6)."""
    check_local_inputs(cfg, item_tables=item_tables)
    publish.check_writable_root(cfg["output"]["root"], key_source(cfg, "output.root"))
    publish.RunLock(cfg["output"]["root"], date, break_stale=break_stale_lock).check_free()


def run_nightly(
    spark: SparkSession,
    cfg: dict[str, Any],
    run_date: dt.date,
    *,
    break_stale_lock: bool = False,
    print_summary: bool = True,
    take_lock: bool = True,
) -> NightlyResult:
    """Run the whole nightly for ``run_date`` and publish it when the quality gate passes.

    Raises a :class:`~mf_spark.errors.PipelineError` subclass (and publishes nothing) on bad input,
    too many rejects, a failed gate or a held lock (a :class:`~mf_spark.errors.ConfigError` too when the
    ALS blocks turn out too large for the data, after ingest), and
    :class:`~mf_spark.errors.OutOfSpaceError` on a full disk, after removing the failed run's tables.
    """
    from mf_spark.evaluate.models import persistent_rdd_ids, unpersist_since
    from mf_spark.recommend.tables import read_item_table

    root = cfg["output"]["root"]
    timer = StageTimer()  # the lock creates a missing root, with a warning (a typo there renumbers every id)
    rec_cfg = cfg["recommend"]
    # A backfill holds the lock over all its dates (take_lock=False here) so nothing slips in between.
    lock = publish.RunLock(root, run_date=run_date, break_stale=break_stale_lock) if take_lock else nullcontext()
    # Everything the day caches (ingest outputs, factors, top-k payloads) is released when it ends: a
    # backfill runs its dates in one session, and each date added four cached tables to the executors.
    cached_before = persistent_rdd_ids(spark)
    # Read (the schema only) before anything is written: a table without item_id failed in the recommend
    # stage, after ingest had extended the ID maps.
    item_filter = read_item_table(spark, rec_cfg["item_filter_path"], "item_filter_path")
    allow_list = read_item_table(spark, rec_cfg["allow_list_path"], "allow_list_path")
    run = None
    try:
        with lock:
            run = publish.begin_run(root, run_date)
            log.info("run %s for %s in %s", run.run_id, run_date, run.path)
            settings = {k: v for k, v in cfg.items() if not k.startswith("_")}
            manifest: dict[str, Any] = publish.manifest_base(
                run, config_file=cfg.get("_source", ""), parameters=publish.redact_settings(settings),
            )
            manifest["status"] = "running"
            manifest[publish.BASELINE_KEY] = None
            try:
                # The warm start and the gate's baseline, recorded so that a rerun of this date uses the same
                # one (after a rollback the newest published run before the date is the one rolled back
                # from). Inside the try: a damaged manifest it must read fails this run with a record of why.
                baseline = publish.previous_published(root, before=run_date)
                manifest[publish.BASELINE_KEY] = None if baseline is None else baseline["run_id"]
                # which one it is mattered after a rollback and was only in the manifest
                log.info("baseline (warm start and gate): %s", "none (cold start)" if baseline is None
                         else f"run {baseline['run_id']} of {baseline['run_date']}")
                if baseline is not None:
                    with suppress(OSError):  # a hint only: never the reason a run fails
                        warning = publish.low_space_warning(root, baseline["run_dir"])
                        if warning:
                            log.warning("%s", warning)
                with timer.stage("ingest"):
                    interactions, dim_user, dim_item = _ingest_stage(spark, cfg, run, manifest, print_summary)

                with timer.stage("train"):
                    _train_stage(spark, cfg, run, interactions, dim_user, dim_item, baseline, manifest)

                with timer.stage("recommend"):
                    _recommend_stage(spark, cfg, run, interactions, dim_user, dim_item, item_filter, allow_list)

                with timer.stage("evaluate"):
                    if cfg["evaluate"]["enabled"]:
                        _evaluate_and_gate(spark, cfg, interactions, run, baseline, manifest)

                manifest["outputs"], coverage = output_counts(spark, run)
                manifest["id_maps"] = {"users": dim_user.count(), "items": dim_item.count()}
                manifest["coverage"] = coverage
                manifest["timings"] = timer.seconds
                with timer.stage("publish"):
                    publish.publish_run(run, manifest, keep_runs=cfg["publish"]["keep_runs"])
                manifest["timings"] = timer.seconds
            except (Exception, KeyboardInterrupt, SystemExit) as exc:  # SystemExit: SIGTERM (RunLock)
                # A second signal while the record is written (SIGTERM to spark-submit reaches this driver
                # twice: as the stopped JVM's error, then from the JVM's shutdown) cut it short: no
                # manifest, lock released. Signals wait until the record is whole.
                with publish.signals_deferred():
                    if publish.run_status(run) in ("published", "superseded"):
                        # Ctrl-C after the _PUBLISHED marker and latest.json: consumers read this run, so
                        # its manifest must keep saying published; the handler below marks the error for
                        # the CLI to report.
                        log.warning("interrupted after run %s was published: %s", run.relative_path,
                                    publish.describe_latest(root, run))
                        raise
                    # Any failure, not only the expected ones, and Ctrl-C: a run directory without a
                    # manifest would look like a crash ("partial") and say nothing of why.
                    manifest["status"] = "failed"
                    manifest["error"], full_disk = _failure_error(exc, spark, root, run, timer)
                    manifest["timings"] = timer.seconds
                    try:
                        publish.write_failed_manifest(run, manifest)
                    except Exception as record_exc:  # noqa: BLE001 - never replace the run's own error
                        log.error("run %s failed (%s); its failed manifest could not be written either: %s",
                                  run.relative_path, manifest["error"], record_exc)
                        with suppress(OSError):
                            publish.retract_manifest(run)
                if full_disk:
                    raise OutOfSpaceError(manifest["error"]) from exc
                raise
            finally:
                unpersist_since(spark, cached_before)

        if print_summary:
            print_run_summary(spark, root, run, timer)
    except BaseException as exc:
        # Ctrl-C, SIGTERM or an error in the clean-up, the lock release or the summary, after the run
        # was published: the CLI must not say "nothing was published" (an operator might roll back).
        if run is not None and not hasattr(exc, "published_run"):
            with suppress(Exception):  # never mask the original error
                if publish.run_status(run) in ("published", "superseded"):
                    exc.published_run = run.relative_path  # type: ignore[union-attr]
        raise
    return NightlyResult(run.path, manifest, True)


def _ingest_stage(spark: SparkSession, cfg: dict[str, Any], run: publish.RunDir, manifest: dict[str, Any],
                  print_summary: bool) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Ingest the run date's window into ``run``'s interactions and rejects and extend the ID maps;
    returns the written interactions and the maps ``(dim_user, dim_item)``."""
    from mf_spark.ingest import IngestSettings, format_report_table, run_ingest
    from mf_spark.ingest.stage import write_rejects_for_inspection

    try:
        ingested = run_ingest(
            spark, input_path=cfg["input"]["path"], input_format=cfg["input"]["format"],
            columns=cfg["input"]["columns"], reader_options=cfg["input"]["options"],
            settings=IngestSettings.from_config(cfg["ingest"]), run_date=run.run_date,
            id_map_root=os.path.join(cfg["output"]["root"], "id_maps"), run_id=run.run_id,
        )
    except NoInteractionsLeftError as exc:
        write_rejects_for_inspection(exc, run.sub("rejects"))
        raise
    ingested.interactions.write.parquet(run.sub("interactions"))
    ingested.rejects.write.parquet(run.sub("rejects"))
    # Later stages read the written tables: the caches would hold executor memory (about 15 bytes per
    # interaction) through training, which needs it.
    ingested.unpersist()
    manifest["ingest"] = ingested.report
    if print_summary:
        print(format_report_table(ingested.report))
    return spark.read.parquet(run.sub("interactions")), ingested.dim_user, ingested.dim_item


def _train_stage(spark: SparkSession, cfg: dict[str, Any], run: publish.RunDir, interactions: DataFrame,
                 dim_user: DataFrame, dim_item: DataFrame, baseline: dict[str, Any] | None,
                 manifest: dict[str, Any]) -> None:
    """Fit ImplicitALS (warm-started from ``baseline``'s factors when configured) and write the factor
    tables with string ids into ``run``."""
    train_cfg = cfg["train"]
    initial, previous = (None, None)
    if train_cfg["warm_start"]:
        initial, previous = load_warm_start(spark, cfg["output"]["root"], train_cfg["rank"], baseline)
    max_iter = train_cfg["warm_start_iterations"] if initial is not None else train_cfg["max_iter"]
    log.info("train: %s, %d iterations", "cold start" if previous is None
             else f"warm start from run {previous['run_id']}", max_iter)
    model = build_estimator(train_cfg, max_iter).setInitialModel(initial).fit(interactions)
    _with_string_ids(model.userFactors, dim_user, "user_idx", "user_id").write.parquet(run.sub("user_factors"))
    _with_string_ids(model.itemFactors, dim_item, "item_idx", "item_id").write.parquet(run.sub("item_factors"))
    for broadcast in model.trainingBroadcasts:  # the factors are written; a backfill goes on
        broadcast.destroy()
    model.userFactors.unpersist()  # recommend and evaluate read the written tables
    model.itemFactors.unpersist()
    manifest["train"] = {
        "warm_start_from": None if previous is None else previous.get("run_id"),
        "iterations": max_iter, "training_loss": model.trainingLoss,
        "iteration_seconds": model.iterationSeconds,
    }


def _recommend_stage(spark: SparkSession, cfg: dict[str, Any], run: publish.RunDir, interactions: DataFrame,
                     dim_user: DataFrame, dim_item: DataFrame, item_filter: DataFrame | None,
                     allow_list: DataFrame | None) -> None:
    """Write ``run``'s recommendations and similar items from its written factor tables."""
    from mf_spark.recommend import build_recommendation_tables

    # The same function as jobs/recommend.py, so that the item filter, the allow list, broadcast_max_mb
    # and fold-in mean the same in both (they once drifted apart).
    tables = build_recommendation_tables(
        spark.read.parquet(run.sub("user_factors")).select("id", "features"),
        spark.read.parquet(run.sub("item_factors")).select("id", "features"),
        interactions, dim_user, dim_item, recommend_settings_from(cfg), item_filter=item_filter,
        allow_list=allow_list,
    )
    # Plain writes, not write_tables_replacing: this run is not published yet and nobody reads it.
    tables.recommendations.write.parquet(run.sub("recommendations"))
    tables.similar_items.write.parquet(run.sub("similar_items"))
    tables.release()  # the session lives on (a backfill): free the scoring's cache and broadcasts


def _evaluate_and_gate(spark: SparkSession, cfg: dict[str, Any], interactions: DataFrame, run: publish.RunDir,
                       baseline: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Evaluate on the configured split (report in ``run/evaluation``) and apply the quality gate against
    ``baseline``'s metrics; raises QualityGateError when it fails."""
    from mf_spark.evaluate import evaluate_gate, evaluate_holdout
    from mf_spark.evaluate.holdout import holdout_settings_from

    metrics = evaluate_holdout(spark, interactions, out_dir=run.sub("evaluation"), **holdout_settings_from(cfg))
    manifest["metrics"] = metrics
    gate_cfg = cfg["evaluate"]["gate"]
    if not gate_cfg["enabled"]:
        return
    gate = evaluate_gate(
        metrics, None if baseline is None else baseline.get("metrics"), metric=gate_cfg["metric"],
        min_value=gate_cfg["min_value"], max_relative_drop=gate_cfg["max_relative_drop"],
    )
    manifest["gate"] = {"passed": gate.passed, "reason": gate.reason}
    if not gate.passed:
        raise QualityGateError(f"quality gate failed: {gate.reason}")
    log.info("quality gate passed: %s", gate.reason)


def _failure_error(exc: BaseException, spark: SparkSession, root: str, run: publish.RunDir,
                   timer: StageTimer) -> tuple[str, bool]:
    """The failed manifest's ``error`` for ``exc``, and whether a full disk caused it (the failed run's
    tables are then removed: they hold the space the record needs)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)", False
    if isinstance(exc, SystemExit):
        return f"terminated (exit {exc.code}; SIGTERM gives 143)", False
    if not isinstance(exc, PipelineError) and spark_context_stopped(spark):
        text = error_text(exc).strip()
        first_line = text.splitlines()[0] if text else ""
        return ("the Spark driver stopped during the run (spark-submit got SIGTERM, e.g. a scheduler's timeout "
                "or `yarn application -kill`, or the driver JVM failed): "
                f"{type(exc).__name__}: {first_line}"), False
    if isinstance(exc, PipelineError):
        return str(exc), False
    if out_of_space(exc):
        # On a full disk the manifest write failed too, and the next run deleted the directory as a
        # crash's, with the only word of why.
        try:
            removed = publish.remove_tables(run)
        except Exception as remove_exc:  # noqa: BLE001 - the record matters more
            log.error("could not remove the tables of failed run %s: %s", run.relative_path, remove_exc)
            removed = False
        return out_of_space_message(exc, root, timer, removed), True
    # a Py4J error's text is the whole Java stack: its cause is the line that matters
    return f"{type(exc).__name__}: {java_cause(exc)}", False


def out_of_space_message(exc: BaseException, root: str, timer: StageTimer | None = None,
                         tables_removed: bool = True) -> str:
    """What a full disk stopped, for the failed manifest and the job's ``error:`` line. The full disk may
    be output.root's or Spark's scratch (``spark.local.dir``): the file or Java cause says which."""
    stage = f" in stage {next(reversed(timer.seconds))}" if timer and timer.seconds else ""
    where = failing_file_or_cause(exc)
    tables = ("the failed run's tables were removed to free space" if tables_removed
              else "the failed run's tables could not all be removed")
    return (f"no space left on device{stage} ({where}); nothing was published and latest.json is unchanged; "
            f"{tables}. Free space on that disk (output.root = {root}, or Spark's spark.local.dir) and rerun")


def print_run_summary(spark: SparkSession, root: str, run: publish.RunDir, timer: StageTimer) -> None:
    print()
    print(timer.table())
    print()
    print(f"published run: {run.path}")
    # publish_run leaves latest.json on a later date when an older date is (re)run: say which run it names.
    print(f"latest:        {publish.describe_latest(root, run)}")
    for name in ("recommendations", "similar_items", "user_factors", "item_factors", "interactions", "rejects", "evaluation"):
        if os.path.exists(run.sub(name)):  # no evaluation/ when evaluate.enabled = false
            print(f"  {name:<16} {run.sub(name)}")
    print()
    print("top-N sample (the 3 users with the longest history, top 5 each):")
    recs = spark.read.parquet(run.sub("recommendations"))
    interactions = spark.read.parquet(run.sub("interactions"))
    dim_user = spark.read.parquet(run.sub("user_factors")).select(F.col("id").alias("user_idx"), "user_id")
    busiest = (interactions.groupBy("user_idx").count().join(dim_user, "user_idx")
               .orderBy(F.desc("count"), "user_id").limit(3).collect())
    users = [r.user_id for r in busiest]
    rows = recs.where(F.col("user_id").isin(users) & (F.col("rank") <= 5)).orderBy("user_id", "rank").collect()
    for r in rows:
        print(f"  user {r.user_id:>8}  #{r.rank}  item {r.item_id:<10} score {r.score:.4f}")


def run_backfill(spark: SparkSession, cfg: dict[str, Any], start: dt.date, end: dt.date, *,
                 break_stale_lock: bool = False, skip_empty_days: bool = False) -> list[NightlyResult]:
    """Run the nightly for each date from ``start`` to ``end`` in order, each warm-started from the
    previous one; stop at the first failure with a message naming the date to resume from.

    With ``skip_empty_days`` a date whose window holds no event (:class:`~mf_spark.errors.NoEventsError`)
    is logged, keeps its failed run directory and is passed over; the skipped dates are listed at the
    end. Every other failure still stops the backfill. Returns the published runs, oldest first.
    The output root's lock is held from the first date to the last, so no other run or rollback
    slips in between two dates.

    Raises
    ------
    ConfigError
        When ``end`` is before ``start``.
    NoEventsError
        With ``skip_empty_days``, when every date was empty (nothing was published: most likely the
        wrong ``input.path``, not a run of holidays).
    """
    from mf_spark.errors import ConfigError

    if end < start:
        raise ConfigError(f"backfill: --to {end} is before --from {start}")
    warn_about_retention(cfg["output"]["root"], start, end, cfg["publish"]["keep_runs"])
    with publish.RunLock(cfg["output"]["root"], run_date=start, break_stale=break_stale_lock, purpose="backfill"):
        return _backfill_dates(spark, cfg, start, end, skip_empty_days)


def _backfill_dates(spark: SparkSession, cfg: dict[str, Any], start: dt.date, end: dt.date,
                    skip_empty_days: bool) -> list[NightlyResult]:
    from mf_spark.errors import NoEventsError

    results: list[NightlyResult] = []
    skipped: list[dt.date] = []
    day = start
    while day <= end:
        try:
            results.append(run_nightly(spark, cfg, day, take_lock=False))
        except NoEventsError as exc:
            if not skip_empty_days:
                exc.args = (f"backfill stopped at {day}: {exc}. Resume with --from {day} --to {end}, "
                            "or add --skip-empty-days to pass over dates without events",)
                raise
            log.warning("backfill: skipped %s, no events in its window (its failed run is kept for "
                        "inspection until retention removes it): %s", day, exc)
            skipped.append(day)
        except PipelineError as exc:
            exc.args = (f"backfill stopped at {day}: {exc}. Resume with --from {day} --to {end}",)
            raise
        except BaseException as exc:
            # Ctrl-C, SIGTERM, a Spark failure: the CLI said "nothing was published" although the
            # earlier dates were. It prints this instead.
            resume = day + dt.timedelta(days=1) if getattr(exc, "published_run", None) else day
            done = [r.manifest["run"]["run_date"] for r in results]
            exc.backfill_note = (  # type: ignore[union-attr]
                f"backfill stopped at {day}; published before it: {', '.join(done) or 'none'}"
                + (f". Resume with --from {resume} --to {end}" if resume <= end else ""))
            raise
        day += dt.timedelta(days=1)
    if skipped:
        listed = ", ".join(d.isoformat() for d in skipped)
        if not results:
            raise NoEventsError(f"backfill {start} .. {end}: no date had events in its window, nothing was "
                                f"published (skipped: {listed}); check input.path and ingest.lookback_days")
        log.warning("backfill %s .. %s: published %d date(s), skipped %d with no events: %s",
                    start, end, len(results), len(skipped), listed)
        print(f"backfill: skipped {len(skipped)} date(s) with no events: {listed}")
    removed = [r for r in results if not os.path.isdir(r.run_dir)]
    if removed:
        dates = ", ".join(r.manifest["run"]["run_date"] for r in removed)
        message = (f"backfill: retention has removed {len(removed)} of the {len(results)} run(s) this backfill "
                   f"published ({dates}): publish.keep_runs = {cfg['publish']['keep_runs']} keeps the newest "
                   "run dates")
        log.warning("%s", message)
        print(message)
    return results


def warn_about_retention(root: str, start: dt.date, end: dt.date, keep_runs: int) -> None:
    """Warn before a backfill whose runs retention will remove: it keeps the newest ``keep_runs`` run
    *dates*, so old dates published today go first (each run is protected only while it is published)."""
    later = len({r["run_date"] for r in publish.list_runs(root)  # retention keeps dates, not runs
                 if r["status"] in ("published", "superseded") and r["run_date"] > end.isoformat()})
    days = (end - start).days + 1
    if later + days > keep_runs:
        log.warning("backfill %s .. %s: retention (publish.keep_runs = %d) keeps the newest run dates; with %d "
                    "later date(s) published after %s, it will remove backfilled runs as later ones are "
                    "published. To keep them all, add --set publish.keep_runs=%d",
                    start, end, keep_runs, later, end, later + days)


def check_model_out(path: str) -> None:
    """Refuse, before Spark starts, a local ``--model-out`` that could not be written, or that exists and
    is not a saved model: saving replaces the directory, and a mistyped output root or run directory
    would be deleted with everything in it.

    Raises
    ------
    UsageError
        Naming the flag and the reason.
    """
    if "://" in path:
        return  # only Spark can see it
    reason = publish.unwritable_reason(path)
    if reason:
        raise UsageError(f"--model-out {path} cannot be written: {reason}")
    if os.path.exists(path) and _saved_model_class(path) is None:
        # A directory that merely has a metadata/ (a project's, a docs tree's) was replaced whole.
        raise UsageError(f"--model-out {path} exists and is not a saved model (no metadata/part-* naming a "
                         "model class in it); refusing to replace it. Give a new directory, or remove this one by "
                         "hand")


def _saved_model_class(path: str) -> str | None:
    """The model class a saved model at ``path`` names in its ``metadata/part-*``, or None."""
    import json

    from mf_spark.als.model import LOADABLE_MODEL_CLASSES

    parts = sorted(Path(path, "metadata").glob("part-*")) if os.path.isdir(os.path.join(path, "metadata")) else []
    try:
        with open(parts[0], encoding="utf-8") as f:
            name = json.loads(f.readline()).get("class")
    except (IndexError, OSError, ValueError, AttributeError):
        return None
    return name if name in LOADABLE_MODEL_CLASSES else None


def save_model(model: ImplicitALSModel, path: str) -> None:
    """Save ``model`` to ``path``, replacing a previous model there.

    A local path is written to a hidden sibling first and swapped in once complete
    (:func:`mf_spark.publish.replace_dir`): ``overwrite()`` would delete the previous model before a
    write that may fail. URIs go through Spark's overwrite.
    """
    if "://" in path:
        model.write().overwrite().save(path)
        return
    tmp = publish.temp_sibling(path)
    try:
        model.write().save(str(tmp))
        publish.replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_and_save(spark: SparkSession, train: dict[str, Any], interactions_path: str, model_out: str) -> None:
    """Fit on a stored interaction table and save the model; prints where, with iterations, time and final loss."""
    from mf_spark.tables import INTERACTION_COLUMNS, read_parquet_table

    require_local_path(interactions_path, f"train: interactions {interactions_path} does not exist")
    check_model_out(model_out)
    interactions = read_parquet_table(spark, interactions_path, "train: interactions", INTERACTION_COLUMNS)
    model = build_estimator(train, train["max_iter"]).fit(interactions)
    model.provenance = publish.provenance(interactions=interactions_path)
    save_model(model, model_out)
    # The per-iteration lines were logged as the fit ran; repeating them after the save read as a second fit.
    print(f"model saved to {model_out}: {len(model.trainingLoss)} iterations in {sum(model.iterationSeconds):.1f} s, "
          f"final loss {model.trainingLoss[-1]:.6e}")


@dataclass(frozen=True)
class RecommendJob:
    """What ``jobs/recommend.py`` reads and rewrites, checked before Spark starts
    (:func:`check_recommend_job`)."""

    run_dir: str
    model_dir: str | None
    interactions_path: str | None
    #: the run date for the log: ``--date``, else the ``dt=`` of ``run_dir``, else "not given"
    date_label: str
    #: ``output.root`` when ``run_dir`` lies inside it (the job then holds the root's lock), else None
    locked_root: str | None
    lock_date: dt.date
    break_stale_lock: bool = False


def _root_holding(cfg: dict[str, Any], run_dir: str) -> str | None:
    # A run being rewritten must not be deleted by a nightly's retention (or raced by a rollback).
    root = os.path.realpath(cfg["output"]["root"])
    return cfg["output"]["root"] if os.path.commonpath([root, os.path.realpath(run_dir)]) == root else None


def check_recommend_job(cfg: dict[str, Any], run_dir: str, *, date: dt.date | None = None,
                        model_dir: str | None = None, interactions_path: str | None = None,
                        break_stale_lock: bool = False) -> RecommendJob:
    """Check the recommend job's paths before Spark starts.

    Raises
    ------
    UsageError
        ``--model`` without ``--interactions``; a ``--date`` that contradicts ``run_dir``'s ``dt=``; a URL
        as ``run_dir`` (its tables are swapped in with rename(2)); a ``run_dir`` that cannot be written.
    InputDataError
        A missing local input (the run directory, the model, the interactions, the config's lists).
    LockHeldError
        ``run_dir`` lies inside an output root another job holds.
    """
    if model_dir and not interactions_path:
        raise UsageError("--model needs --interactions (the history whose items are excluded and folded in)")
    # The date selects nothing (the run directory does); a different dt= in the path is a mix-up.
    in_path = re.search(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?:/|$)", run_dir)
    if date and in_path and in_path.group(1) != date.isoformat():
        raise UsageError(f"--date {date} but --run-dir is a run of {in_path.group(1)}; the run directory "
                         "decides what is read, --date only labels the log")
    run_date = date or (dt.date.fromisoformat(in_path.group(1)) if in_path else None)
    if "://" in run_dir:
        # Its tables are swapped in with rename(2), like output.root's (docs/operations.md, Storage).
        raise UsageError(f"--run-dir {run_dir}: must be a local (POSIX) path, not a URL")
    reason = publish.unwritable_reason(run_dir) if model_dir else None
    if reason:
        raise UsageError(f"--run-dir {run_dir} cannot be written: {reason}")
    check_local_inputs(cfg, events=False)
    for flag, path in (("--model", model_dir), ("--interactions", interactions_path),
                       ("--run-dir", None if model_dir else run_dir)):
        require_local_path(path, f"recommend: {flag} {path} does not exist")
    job = RecommendJob(run_dir, model_dir, interactions_path, str(run_date or "not given"),
                       _root_holding(cfg, run_dir), run_date or dt.date.today(), break_stale_lock)
    if job.locked_root:
        publish.RunLock(job.locked_root, job.lock_date, break_stale=break_stale_lock).check_free()
    return job


def run_recommend_job(spark: SparkSession, cfg: dict[str, Any], job: RecommendJob) -> dict[str, int]:
    """Write ``recommendations`` and ``similar_items`` into ``job.run_dir`` (holding the root's lock when it
    lies in ``output.root``); returns their row counts (:func:`mf_spark.recommend.run_recommend_stage`)."""
    from mf_spark.recommend import run_recommend_stage

    log.info("recommend: run date %s, run directory %s", job.date_label, job.run_dir)
    lock = (publish.RunLock(job.locked_root, job.lock_date, break_stale=job.break_stale_lock, purpose="recommend")
            if job.locked_root else nullcontext())
    with lock:
        return run_recommend_stage(
            spark, job.run_dir, recommend_settings_from(cfg), id_map_dir=os.path.join(cfg["output"]["root"], "id_maps"),
            item_filter_path=cfg["recommend"]["item_filter_path"], allow_list_path=cfg["recommend"]["allow_list_path"],
            model_dir=job.model_dir, interactions_path=job.interactions_path,
        )
