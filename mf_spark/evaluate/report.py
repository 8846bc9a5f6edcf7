"""Files of an evaluation run: ``metrics.json``, ``report.md`` and PNG plots.

Plots (matplotlib, Agg backend, no display needed): ``metric_vs_k.png`` (every model, six metrics),
``training_loss.png`` (ImplicitALS's loss per iteration; MLlib exposes none; only with a factor model)
and, in tuning mode with a tuned model, ``tuning_metric_vs_rank.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from mf_spark.evaluate.metrics import metric_name
from mf_spark.evaluate.tuning import CONDITIONAL
from mf_spark.publish import json_ready

log = logging.getLogger(__name__)

TABLE_METRICS = (
    ("precision", "P"),
    ("recall", "Recall"),
    ("capped_recall", "Capped recall"),
    ("map", "MAP"),
    ("ndcg", "NDCG"),
    ("hit_rate", "Hit rate"),
    ("mrr", "MRR"),
    ("coverage", "Coverage"),
    ("popularity", "Pop. pct"),
)
# capped_recall left out: beside recall it draws nearly the same curve; popularity shows the lists' bias
PLOT_METRICS = ("ndcg", "recall", "map", "precision", "coverage", "popularity")
PLOT_Y_LABELS = {
    "coverage": "share of training items listed",
    "popularity": "mean popularity percentile",
}
# Okabe-Ito colours (told apart with colour-blindness) and one marker and dash per model: the two ALS
# models' curves lie on top of each other and were one line.
MODEL_STYLES = (
    ("#0072B2", "o", "-"), ("#E69F00", "s", "--"), ("#009E73", "^", "-."), ("#CC79A7", "D", ":"),
    ("#D55E00", "v", "-"), ("#56B4E9", "P", "--"), ("#000000", "X", "-."),
)


def _style(index: int) -> dict[str, Any]:
    color, marker, linestyle = MODEL_STYLES[index % len(MODEL_STYLES)]
    return {"color": color, "marker": marker, "linestyle": linestyle}
PARAM_COLUMNS = (
    "rank",
    "max_iter",
    "reg_param",
    "alpha",
    "regularization",
    "frequency_alpha0",
    "frequency_nu",
    "confidence",
    "solver",
    "cg_steps",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _param(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _fmt(value)


#: Parameters a model's fit ignores (MLlib has one exact solver); shown as "-" in its row.
IGNORED_BY_MODEL = {"mllib_als": ("solver", "cg_steps")}


def _param_value(params: dict[str, Any], name: str, model: str = "") -> Any:
    """``params[name]``, or ``None`` where the parameter has no effect (tuning's ``CONDITIONAL``, or a
    parameter the model ignores)."""
    if name in IGNORED_BY_MODEL.get(model, ()):
        return None
    if name in CONDITIONAL:
        other, value = CONDITIONAL[name]
        if params.get(other) != value:
            return None
    return params.get(name)


def _signed(value: float) -> str:
    # +.4f printed a bound of -3.3e-05 as "-0.0000", hiding whether the interval excludes 0
    return f"{value:+.4f}" if value == 0 or abs(value) >= 5e-5 else f"{value:+.1e}"


def _interval(difference: dict[str, float | None]) -> str:
    mean = difference["mean"]
    if mean is None or math.isnan(mean):  # no shared test user (metrics.json: null)
        return "n/a (no users)"
    return f"{_signed(mean)} [{_signed(difference['low'])}, {_signed(difference['high'])}]"


def _summary_k(result: Mapping[str, Any], k: int | None = None) -> int:
    ks = result["ks"]
    return k or (20 if 20 in ks else ks[0])


def summary_table(result: Mapping[str, Any], k: int | None = None) -> str:
    """A Markdown table of the main metrics at ``k`` (default: 20 if evaluated, else the smallest K), with
    the primary model's NDCG@k lead over each other model and its paired 95% interval over test users."""
    k = _summary_k(result, k)
    primary, ndcg = result["primary_model"], metric_name("ndcg", k)
    rows = [
        [name]
        + [run["metrics"].get(f"{m}@{k}") for m, _ in TABLE_METRICS]
        + [_interval(run["primary_minus_model"][ndcg]) if run.get("primary_minus_model") else "-"]
        for name, run in result["models"].items()
    ]
    header = ["model"] + [label for _, label in TABLE_METRICS] + [f"{primary} minus model, {ndcg} [95%]"]
    return f"K = {k}\n" + _table(header, rows)


def verdict_lines(result: Mapping[str, Any], k: int | None = None) -> list[str]:
    """One line per other model: the primary model's NDCG@k lead, its 95% interval, the relative lead, and
    whether the interval excludes 0 (more than which users were drawn)."""
    k = _summary_k(result, k)
    primary, ndcg = result["primary_model"], metric_name("ndcg", k)
    lines = []
    for name, run in result["models"].items():
        difference = (run.get("primary_minus_model") or {}).get(ndcg)
        if not difference or difference["mean"] is None or math.isnan(difference["mean"]):
            continue
        theirs = run["metrics"].get(ndcg)
        relative = f", {difference['mean'] / theirs:+.1%} relative" if theirs else ""
        if difference.get("n_users", 2) < 2:
            reading = "one shared test user, so no interval to judge by"  # low = high = mean then
        elif difference["low"] > 0:
            reading = "ahead by more than user sampling explains"
        elif difference["high"] < 0:
            reading = "behind by more than user sampling explains"
        else:
            reading = "no difference beyond user sampling (the interval holds 0)"
        lines.append(f"- {primary} vs {name}: NDCG@{k} {_interval(difference)}{relative}: {reading}.")
    return lines


def console_summary(result: Mapping[str, Any], gate_metric: str | None = None, gate_min_value: float = 0.0) -> str:
    """What the evaluate job prints: the K = 20 table, the verdict lines and, with ``gate_metric``, whether
    the nightly's gate minimum would pass."""
    from mf_spark.evaluate.gate import minimum_check_line

    lines = [summary_table(result), *verdict_lines(result)]
    if gate_metric:
        lines.append(minimum_check_line(dict(result), gate_metric, gate_min_value))
    return "\n".join(lines)


#: What the table columns and count rows mean, for a reader without docs/evaluation.md at hand.
GLOSSARY = (
    "P: hits in the top K / K. Recall: hits / the user's test items. Capped recall: hits / min(K, test "
    "items), the papers' Recall@K. MAP and NDCG: binary-gain ranking scores (1 = every hit at the top). Hit "
    "rate: share of users with any hit. MRR: 1 / rank of the first hit. Coverage: share of the training "
    "items that appear in any list. Pop. pct: mean popularity percentile of the listed items (0.5 = typical, "
    "1.0 = the most popular item); a high value means the lists favour popular items. All but coverage and "
    "Pop. pct are means over test users with training history; definitions in docs/evaluation.md."
)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


#: Keys of a provenance record left to metrics.json: how it ran, not what was evaluated.
_SOURCE_DETAILS = ("versions", "host", "pid", "started_at", "argv")


def source_line(source: dict[str, Any]) -> str:
    """One line of an evaluation's ``source`` (e.g. a :func:`mf_spark.publish.provenance` record): what
    was evaluated and by which command; the versions, host, pid and start time stay in metrics.json."""
    first = [k for k in ("interactions", "run_date", "git_commit") if k in source]
    rest = [k for k in source if k not in first and k not in _SOURCE_DETAILS]
    shown = [(k, source[k]) for k in first + rest if source[k] not in (None, "")]
    if source.get("argv"):
        shown.append(("command", shlex.join(map(str, source["argv"]))))
    return ", ".join(f"{k} `{v}`" for k, v in shown)


def render_markdown(result: dict[str, Any]) -> str:
    """``report.md`` of an :func:`~mf_spark.evaluate.evaluate_holdout` result: the verdict first, then the
    data, the tables at every K, the paired differences, parameters, loss and tuning."""
    split = result["split"]
    out = ["# Offline evaluation", ""]
    if result.get("source"):
        out += [f"Evaluated: {source_line(result['source'])}", ""]
    # test_n = 0 means "use test_fraction": shown, it read as "no test rows"
    settings = ", ".join(f"{k}={v}" for k, v in split["settings"].items() if not (k == "test_n" and v == 0))
    out += [
        f"Split: **{split['protocol']}** ({settings}). Models exclude each user's known items and "
        "recommend only items seen in training. Metric definitions: docs/evaluation.md.",
        "",
    ]
    out += _summary_section(result) + _data_section(result) + _results_sections(result)
    out += _parameters_and_loss_sections(result) + _tuning_section(result)
    if result.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]] + [""]
    return "\n".join(out)


def _summary_section(result: dict[str, Any]) -> list[str]:
    out = ["## Summary", ""]
    verdicts = verdict_lines(result)
    if verdicts:
        out += [
            *verdicts,
            "",
            "The intervals are 95% over the test users, paired (both models scored on the same users); they do "
            "not cover the seed or the choice of parameters. With many metrics compared, some intervals "
            "exclude 0 by chance: judge by the metric chosen beforehand (the gate's or tuning's).",
            "",
        ]
    return out + [summary_table(result).replace("\n", "\n\n", 1), "", GLOSSARY, ""]


def _data_section(result: dict[str, Any]) -> list[str]:
    counts = result["split"]["counts"]
    out = ["## Data", "", _table(["count", "value"], [[k, v] for k, v in {**result["data"], **counts}.items()]), ""]
    if counts.get("cold_test_users"):
        out += [
            f"{counts['cold_test_users']} test users ({counts['cold_test_interactions']} interactions) have no "
            "training history; they are counted here and not scored.",
            "",
        ]
    if counts.get("test_interactions_not_positive"):
        out += [
            f"{counts['test_interactions_not_positive']} held-out rows have strength <= 0 (confident dislikes, "
            "e.g. returns): they are never counted as hits, and a user is scored only with a held-out row "
            "of strength > 0.",
            "",
        ]
    if counts.get("test_interactions_unseen_items"):
        out += [
            f"{counts['test_interactions_unseen_items']} test interactions are on "
            f"{counts['test_items_unseen_in_train']} items unseen in training: no model can recommend them, "
            "they stay in the denominators.",
            "",
        ]
    return out


def _results_sections(result: dict[str, Any]) -> list[str]:
    models = result["models"]
    out = []
    for k in result["ks"]:
        rows = [[name] + [run["metrics"].get(f"{m}@{k}") for m, _ in TABLE_METRICS] for name, run in models.items()]
        out += [f"## Results at K = {k}", "", _table(["model"] + [label for _, label in TABLE_METRICS], rows), ""]
    compared = [
        (name, run["primary_minus_model"]) for name, run in models.items() if run.get("primary_minus_model")
    ]
    if compared:
        columns = list(compared[0][1])
        out += [
            f"## {result['primary_model']} minus each other model",
            "",
            "Mean per-user difference with a 95% interval over the test users (paired: both models are "
            "scored on the same users). A gap whose interval excludes 0 is more than which users were "
            "drawn; the interval does not cover the seed of the initial factors or the choice of parameters.",
            "",
            _table(["model", *columns], [[name, *(_interval(d[c]) for c in columns)] for name, d in compared]),
            "",
        ]
    return out


def _parameters_and_loss_sections(result: dict[str, Any]) -> list[str]:
    models = result["models"]
    rows = [
        [name, *(_param(_param_value(run["params"], c, name)) for c in PARAM_COLUMNS), f"{run['fit_seconds']:.1f}"]
        for name, run in models.items()
    ]
    out = ["## Parameters", "", _table(["model", *PARAM_COLUMNS, "fit s"], rows), ""]
    out += ["## Training loss", "", "Of each model's fit on the split's training part (not the published model's).", ""]
    for name, run in models.items():
        loss = run.get("training_loss")
        if loss:
            # whether the fit had settled: a plot of the whole descent hides a last step still worth having
            last_step = (f" (the last iteration changed it by {loss[-1] / loss[-2] - 1:+.2%})"
                         if len(loss) > 1 and loss[-2] else "")
            out.append(f"- {name}: {len(loss)} iterations, loss {loss[0]:.6g} -> {loss[-1]:.6g}{last_step}")
        elif name == "mllib_als":
            final = run.get("final_loss")
            out.append(
                "- mllib_als: MLlib ALS does not expose a training loss"
                + (f"; the same objective on its final factors is {final:.6g}." if final is not None else ".")
            )
    return out + [""]


def _tuning_section(result: dict[str, Any]) -> list[str]:
    tuning = result.get("tuning") or {}
    if not tuning.get("enabled"):
        return []
    out = [
        "## Tuning",
        "",
        f"Chosen by {tuning['metric']} on a validation split carved from the training part "
        f"({tuning['mode']} search); test metrics above are for the chosen parameters. \"fit s\" of the "
        "first trials includes the start-up of Spark's Python workers and caches: compare later ones.",
        "",
    ]
    for name, run in result["models"].items():
        trials = run.get("tuning_trials")
        if not trials:
            continue
        names = list(trials[0]["params"])
        chosen = _chosen_trial(trials)
        rows = [
            [*(_param(t["params"][n]) for n in names), t["value"], f"{t['fit_seconds']:.1f}",
             "yes" if i == chosen else ""]
            for i, t in enumerate(trials)
        ]
        out += [f"### {name}", "", _table([*names, f"validation {tuning['metric']}", "fit s", "chosen"], rows), ""]
        edges = _grid_edges(trials, trials[chosen]["params"])
        if edges:
            out += [f"Chosen at the edge of the values tried: {'; '.join(edges)}. A value beyond it may score "
                    "better: widen the grid to check.", ""]
    return out


def _plot_metric_vs_k(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    ks = result["ks"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), constrained_layout=True)
    for ax, metric in zip(axes.flat, PLOT_METRICS, strict=True):
        for index, (name, run) in enumerate(result["models"].items()):
            ax.plot(ks, [run["metrics"].get(f"{metric}@{k}", float("nan")) for k in ks], label=name,
                    markerfacecolor="none", **_style(index))
        ax.set_title(f"{metric}@K")
        ax.set_xlabel("K")
        ax.set_ylabel(PLOT_Y_LABELS.get(metric, f"mean {metric} over test users"))
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(
        f"Ranking metrics vs K ({result['split']['protocol']} split, "
        f"{result['split']['counts']['test_users']} test users)"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_training_loss(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    from matplotlib.ticker import MaxNLocator

    without = []
    for index, (name, run) in enumerate(result["models"].items()):
        loss = run.get("training_loss")
        if loss:
            ax.plot(range(1, len(loss) + 1), loss, label=name, markerfacecolor="none", **_style(index))
        elif name == "mllib_als":
            without.append(name)
            final, iterations = run.get("final_loss"), run["params"].get("max_iter")
            if final is not None and iterations:
                # one point: MLlib reports no per-iteration loss, only its final factors can be scored
                ax.plot(
                    [iterations],
                    [final],
                    marker="*",
                    markersize=14,
                    linestyle="none",
                    label=f"{name} (objective of its final factors)",
                )

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # log: on a linear axis the first iteration dwarfs the rest and a fit still improving looked flat
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (objective, log scale)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    note = "MLlib ALS exposes no per-iteration loss" if without else ""
    ax.set_title("Training loss per iteration, fits on the split's training part" + (f"\n({note})" if note else ""))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tuning(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    metric = result["tuning"]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for index, (name, run) in enumerate(result["models"].items()):
        trials = run.get("tuning_trials") or []
        if not trials:
            continue
        style = _style(index)
        ranks = sorted({t["params"]["rank"] for t in trials})
        best = [max(t["value"] for t in trials if t["params"]["rank"] == r) for r in ranks]
        ax.plot(ranks, best, label=f"{name} (best per rank, other parameters may differ)", **style)
        ax.scatter([t["params"]["rank"] for t in trials], [t["value"] for t in trials], alpha=0.35,
                   color=style["color"], s=18)
        chosen = trials[_chosen_trial(trials)]
        ax.scatter([chosen["params"]["rank"]], [chosen["value"]], marker="*", s=220, color=style["color"],
                   edgecolors="black", zorder=3, label=f"{name} chosen: {_trial_label(chosen['params'])}")
    all_ranks = sorted(
        {t["params"]["rank"] for run in result["models"].values() for t in run.get("tuning_trials") or []}
    )
    if len(all_ranks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(all_ranks, [str(r) for r in all_ranks])
    ax.minorticks_off()
    ax.set_xlabel("rank")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Tuning: validation {metric} vs rank (dots: every trial, star: chosen)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _chosen_trial(trials: list[dict[str, Any]]) -> int:
    """The index of the trial tuning chose: the best value, the first of equal values (as tuning keeps it)."""
    return max(range(len(trials)), key=lambda i: trials[i]["value"])


def _grid_edges(trials: list[dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """``"rank 32 (the largest of 8, 16, 32)"`` for each numeric parameter whose chosen value is the largest
    or smallest of three or more values tried (with two, every pick is at an edge)."""
    edges = []
    for name, value in chosen.items():
        tried = {t["params"].get(name) for t in trials}
        numbers = sorted(v for v in tried if isinstance(v, (int, float)) and not isinstance(v, bool))
        if len(numbers) >= 3 and value in (numbers[0], numbers[-1]):
            which = "largest" if value == numbers[-1] else "smallest"
            edges.append(f"{name} {_param(value)} (the {which} of {', '.join(_param(v) for v in numbers)})")
    return edges


def _trial_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_param(v)}" for k, v in params.items() if v is not None)


REPORT_FILES = ("metrics.json", "report.md", "metric_vs_k.png", "training_loss.png", "tuning_metric_vs_rank.png")


def check_report_dir(out_dir: str | os.PathLike[str]) -> None:
    """Refuse ``out_dir`` when it holds anything but an earlier report, which :func:`write_report` replaces
    whole (``--out ~`` must not delete a home directory), or when it cannot be created or replaced.

    Raises
    ------
    UsageError
    """
    from mf_spark.errors import UsageError
    from mf_spark.publish import unwritable_reason

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"report directory (--out) {out}: exists and is not a directory")
    # The report is staged beside out_dir and renamed into place: its parent must be writable. Found
    # only after every model had been trained, this lost the whole evaluation.
    reason = unwritable_reason(out.absolute().parent)
    if reason:
        raise UsageError(f"report directory (--out) {out} cannot be written: {reason}")
    others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES) if out.is_dir() else []
    if others:
        raise UsageError(f"report directory (--out) {out}: holds files other than an evaluation report "
                         f"({', '.join(others[:5])}); "
                         "the report replaces the directory whole, so give a new or a report directory")


def write_report(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``metrics.json``, ``report.md`` and the plots as the directory ``out_dir``.

    They are written into a hidden sibling directory that then replaces ``out_dir`` whole: a failure
    halfway left a new metrics.json beside an old report.md, and a rerun into the same directory kept
    an earlier run's tuning plot. Returns the written file names by kind; their names are also recorded
    in ``result["plots"]``.
    """
    import matplotlib

    from mf_spark import publish

    matplotlib.use("Agg")
    check_report_dir(out_dir)  # a library caller's out_dir too: replacing a directory of other files loses them
    final = Path(out_dir)
    with publish.staged_dir(final) as out:
        _write_report_files(result, out)
    log.info("evaluation report written to %s", final)
    return {
        "metrics": str(final / "metrics.json"),
        "report": str(final / "report.md"),
        **{p: str(final / p) for p in result["plots"]},
    }


def _write_report_files(result: dict[str, Any], out: Path) -> None:
    out.mkdir()
    plots = ["metric_vs_k.png"]
    _plot_metric_vs_k(result, out / plots[0])
    # Only plots with something to draw: without a factor model these were empty axes linked from report.md
    runs = result["models"].values()
    if any(run.get("training_loss") or run.get("final_loss") is not None for run in runs):
        plots.append("training_loss.png")
        _plot_training_loss(result, out / plots[-1])
    if (result.get("tuning") or {}).get("enabled") and any(run.get("tuning_trials") for run in runs):
        plots.append("tuning_metric_vs_rank.png")
        _plot_tuning(result, out / plots[-1])
    result["plots"] = plots
    # NaN (a metric over no user, a diverged loss) as null: bare NaN is not JSON and strict readers refuse it
    (out / "metrics.json").write_text(json.dumps(json_ready(result), indent=2, sort_keys=False) + "\n")
    (out / "report.md").write_text(render_markdown(result))
