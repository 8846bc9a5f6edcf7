"""Last.fm's tuned comparison over several outer train/test splits (the rule is in quality.py).

    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3              # seed 7
    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3 --split-seed 8
    .venv/bin/python benchmarks/quality.py --dataset lastfm-2k --validation-splits 3 --split-seed 9
    .venv/bin/python benchmarks/quality_outer.py

Reads the three runs' JSON from ``benchmarks/results``, checks that each was made under the rule
(outer seed, three validation splits, equal budgets), and writes
``benchmarks/results/quality_lastfm-2k-outer.md``: every split's test NDCG@20 and Recall@20 of each
model with its own tuned parameters, the means, and whether ImplicitALS's means reach MLlib's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import OUTER_SPLIT_SEEDS, run_name  # noqa: E402

VALIDATION_SPLITS = 3
METRICS = (("ndcg@20", "NDCG@20"), ("recall@20", "Recall@20"))  # the criterion's
SHOWN = (*METRICS, ("precision@10", "P@10"))
MODELS = ("implicit_als", "implicit_als_cholesky", "mllib_als", "popular")


def run_path(results: Path, dataset: str, seed: int) -> Path:
    """Where quality.py writes the run with this outer ``seed`` and three validation splits."""
    return results / f"{run_name(dataset, VALIDATION_SPLITS, seed)}.json"


def load_runs(results: Path, dataset: str, seeds: tuple[int, ...]) -> dict[int, dict]:
    """Each outer split's result; refuses a run that was not made under the rule."""
    runs = {}
    for seed in seeds:
        path = run_path(results, dataset, seed)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run benchmarks/quality.py --dataset {dataset} "
                                    f"--validation-splits {VALIDATION_SPLITS} --split-seed {seed}")
        run = json.loads(path.read_text())
        problems = []
        if run["split"]["settings"]["seed"] != seed:
            problems.append(f"split seed {run['split']['settings']['seed']}, expected {seed}")
        if run["tuning"]["validation_splits"] != VALIDATION_SPLITS:
            problems.append(f"{run['tuning']['validation_splits']} validation splits, expected {VALIDATION_SPLITS}")
        if len(set(run["tuning"]["trials"].values())) != 1:
            problems.append(f"unequal tuning budgets {run['tuning']['trials']}")
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


def markdown(dataset: str, runs: dict[int, dict], summary: dict) -> str:
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
    lines += [
        "",
        f"ImplicitALS minus MLlib, means: NDCG@20 {gaps['NDCG@20']:+.4f}, Recall@20 {gaps['Recall@20']:+.4f}: "
        f"criterion **{verdict}** under the rule fixed in `benchmarks/quality.py` (OUTER_SPLIT_SEEDS) "
        "before the runs of splits 8 and 9. Each split: the quality.py protocol with three validation "
        "splits and a budget of MLlib's whole grid (60) per model; the split's own report is "
        "`quality_lastfm-2k-validation-splits-3[-split-seed-N].md`.",
        "Produced by `python benchmarks/quality_outer.py` from the three runs' JSON.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        runs = load_runs(results, "lastfm-2k", OUTER_SPLIT_SEEDS)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarise(runs)
    text = markdown("lastfm-2k", runs, summary)
    (results / "quality_lastfm-2k-outer.md").write_text(text)
    (results / "quality_lastfm-2k-outer.json").write_text(
        json.dumps({"seeds": list(runs), **{k: summary[k] for k in ("means", "met")},
                    "table": {m: {k: {str(s): v for s, v in by.items()} for k, by in t.items()}
                              for m, t in summary["table"].items()}}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
