"""Last.fm's tuned comparison over several outer train/test splits (the rule is in quality.py).

    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3              # seed 7
    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3 --split-seed 8
    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3 --split-seed 9
    .venv/bin/python benchmarks/quality_outer.py

The second budget rule (equal compute, ``COMPUTE_BUDGET_RATIO`` in quality.py) on the same splits,
reusing MLlib's result of the runs above:

    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3 --budget compute \
        --baselines-from benchmarks/results/quality_lastfm-2k-validation-splits-3.json
    (the same with --split-seed 8 / 9 and ...-validation-splits-3-split-seed-8.json / -9.json)
    .venv/bin/python benchmarks/quality_outer.py --budget compute

Reads the three runs' JSON from ``benchmarks/results``, checks that each was made under the rule
(outer seed, three validation splits, the budget rule's trial counts), and writes
``benchmarks/results/quality_lastfm-2k-outer[-budget-compute].md``: every split's test NDCG@20 and
Recall@20 of each model with its own tuned parameters, the means, and whether ImplicitALS's means reach
MLlib's; under the compute rule also each split's tuning fit time per model, the rule's premise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import (  # noqa: E402
    COMPUTE_BUDGET_RATIO,
    OUTER_SPLIT_SEEDS,
    compute_budget,
    run_name,
    tuning_fit_seconds,
)

VALIDATION_SPLITS = 3
METRICS = (("ndcg@20", "NDCG@20"), ("recall@20", "Recall@20"))  # the criterion's
SHOWN = (*METRICS, ("precision@10", "P@10"))
MODELS = ("implicit_als", "implicit_als_cholesky", "mllib_als", "popular")


def run_path(results: Path, dataset: str, seed: int, budget: str = "trials") -> Path:
    """Where quality.py writes the run with this outer ``seed``, three validation splits and ``budget``."""
    return results / f"{run_name(dataset, VALIDATION_SPLITS, seed, budget)}.json"


def load_runs(results: Path, dataset: str, seeds: tuple[int, ...], budget: str = "trials") -> dict[int, dict]:
    """Each outer split's result; refuses a run that was not made under the rule."""
    runs = {}
    for seed in seeds:
        path = run_path(results, dataset, seed, budget)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run benchmarks/quality.py --dataset {dataset} "
                                    f"--validation-splits {VALIDATION_SPLITS} --split-seed {seed}"
                                    + ("" if budget == "trials" else f" --budget {budget} --baselines-from ..."))
        run = json.loads(path.read_text())
        problems = []
        if run["split"]["settings"]["seed"] != seed:
            problems.append(f"split seed {run['split']['settings']['seed']}, expected {seed}")
        if run["tuning"]["validation_splits"] != VALIDATION_SPLITS:
            problems.append(f"{run['tuning']['validation_splits']} validation splits, expected {VALIDATION_SPLITS}")
        trials = run["tuning"]["trials"]
        if budget == "trials" and len(set(trials.values())) != 1:
            problems.append(f"unequal tuning budgets {trials}")
        if budget == "compute" and (
            run["tuning"]["mode"] != "cover"
            or trials != compute_budget(trials.get("mllib_als", 0))
        ):
            problems.append(f"tuning budgets {trials} ({run['tuning']['mode']} search) are not the compute rule's")
        if problems:
            raise ValueError(f"{path}: not made under the outer-split rule: {'; '.join(problems)}")
        runs[seed] = run
    return runs


def summarise(runs: dict[int, dict]) -> dict:
    """Per-model per-metric values by seed and their mean, and the verdict of the rule."""
    table = {
        model: {
            key: {seed: run["models"][model]["metrics"][key] for seed, run in runs.items()} for key, _ in SHOWN
        }
        for model in MODELS
    }
    means = {model: {key: statistics.fmean(v.values()) for key, v in by_key.items()} for model, by_key in table.items()}
    met = all(means["implicit_als"][key] >= means["mllib_als"][key] for key, _ in METRICS)
    return {"table": table, "means": means, "met": met}


def markdown(dataset: str, runs: dict[int, dict], summary: dict, budget: str = "trials") -> str:
    seeds = list(runs)
    header = "| model | " + " | ".join(
        f"{label} split {seed}" for _, label in METRICS for seed in seeds
    ) + " | " + " | ".join(f"{label} mean" for _, label in METRICS) + " |"
    lines = [
        f"### {dataset}: tuned models over {len(seeds)} outer splits",
        "",
        header,
        "|---" * (1 + len(METRICS) * (len(seeds) + 1)) + "|",
    ]
    for model in MODELS:
        cells = [f"{summary['table'][model][key][seed]:.4f}" for key, _ in METRICS for seed in seeds]
        cells += [f"**{summary['means'][model][key]:.4f}**" for key, _ in METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Means over the splits:", "", "| model | " + " | ".join(label for _, label in SHOWN) + " |",
              "|---" * (1 + len(SHOWN)) + "|"]
    for model in MODELS:
        lines.append(f"| {model} | " + " | ".join(f"{summary['means'][model][key]:.4f}" for key, _ in SHOWN) + " |")
    lines += ["", "Chosen parameters per split:", "", "| split | model | rank | reg_param | alpha | regularization |",
              "|---|---|---|---|---|---|"]
    for seed, run in runs.items():
        for model in ("implicit_als", "mllib_als"):
            p = run["models"][model]["params"]
            reg = p["regularization"] if model == "implicit_als" else "count (MLlib)"
            if p["regularization"] == "frequency":
                reg += f" (alpha0 {p['frequency_alpha0']:g}, nu {p['frequency_nu']:g})"
            lines.append(f"| {seed} | {model} | {p['rank']} | {p['reg_param']:g} | {p['alpha']:g} | {reg} |")
    gaps = {label: summary["means"]["implicit_als"][key] - summary["means"]["mllib_als"][key] for key, label in METRICS}
    verdict = "met" if summary["met"] else "not met"
    if budget == "compute":
        lines += ["", "Tuning fit time per split (the compute rule's premise: ImplicitALS's is not larger):", "",
                  "| split | implicit_als trials | implicit_als fit min | mllib_als trials | mllib_als fit min |",
                  "|---|---|---|---|---|"]
        for seed, run in runs.items():
            trials, fit = run["tuning"]["trials"], tuning_fit_seconds(run)
            lines.append(f"| {seed} | {trials['implicit_als']} | {fit['implicit_als'] / 60:.1f} | "
                         f"{trials['mllib_als']} | {fit['mllib_als'] / 60:.1f} |")
        rule = ("the equal-compute rule fixed in `benchmarks/quality.py` (COMPUTE_BUDGET_RATIO) before any run "
                "with it. Each split: three validation splits, ImplicitALS "
                f"{COMPUTE_BUDGET_RATIO}x MLlib's 60 parameter sets, MLlib's grid searched first (cover search); "
                "MLlib's result is the first rule's run on the same split; the split's own report is "
                "`quality_lastfm-2k-validation-splits-3[-split-seed-N]-budget-compute.md`.")
    else:
        rule = ("the rule fixed in `benchmarks/quality.py` (OUTER_SPLIT_SEEDS) before the runs of splits 8 "
                "and 9. Each split: the quality.py protocol with three validation splits and a budget of "
                "MLlib's whole grid (60) per model; the split's own report is "
                "`quality_lastfm-2k-validation-splits-3[-split-seed-N].md`.")
    flag = "" if budget == "trials" else f" --budget {budget}"
    lines += [
        "",
        f"ImplicitALS minus MLlib, means: NDCG@20 {gaps['NDCG@20']:+.4f}, Recall@20 {gaps['Recall@20']:+.4f}: "
        f"criterion **{verdict}** under {rule}",
        f"Produced by `python benchmarks/quality_outer.py{flag}` from the three runs' JSON.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--budget", choices=("trials", "compute"), default="trials",
                        help="which budget rule's runs to aggregate (see quality.py)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        runs = load_runs(results, "lastfm-2k", OUTER_SPLIT_SEEDS, args.budget)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarise(runs)
    text = markdown("lastfm-2k", runs, summary, args.budget)
    stem = "quality_lastfm-2k-outer" + ("" if args.budget == "trials" else f"-budget-{args.budget}")
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(
        json.dumps({"seeds": list(runs), "budget": args.budget, **{k: summary[k] for k in ("means", "met")},
                    "tuning": {str(s): {"trials": run["tuning"]["trials"], "fit_seconds": tuning_fit_seconds(run)}
                               for s, run in runs.items()},
                    "table": {m: {k: {str(s): v for s, v in by.items()} for k, by in t.items()}
                              for m, t in summary["table"].items()}}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
