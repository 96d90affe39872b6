"""A finished `advtrain tune` search against a hand-written recipe's run, at equal training cost.

Reads both from MLflow (the search's parent run, its child run per trial, and the recipe's run by its
run name): per trial the searched values, validation clean/robust accuracy per epoch, training seconds
(the sum of the run's `time/train_s`, i.e. without validation, Ray start-up or test metrics), and how it
ended. "At equal cost" compares each run's best validation robust accuracy reached within the recipe's
training seconds, so a trial that trains longer than the recipe is not credited for the extra time.
Prints a markdown table, writes the rows as JSON and draws the search's clean-vs-robust plot (last
epochs, Pareto front in red) with the recipe's run added.

    MLFLOW_TRACKING_URI=sqlite:///... .venv/bin/python benchmarks/search_vs_recipe.py \\
        --search fmnist-search --recipe-run fmnist-pgd-ref --also fmnist-search-best-4ep
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.orchestrate.search_report import plot_clean_vs_robust
from pipeline.tracking import runs as tracking

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
SEARCHED = ("method.name", "attack.num_steps", "schedule.eps_ramp_epochs")


def run_row(uri: str, run_id: str, budget_s: float | None) -> dict:
    run = tracking.client_for(uri).get_run(run_id)
    robust = tracking.metric_history(uri, run_id, "val/robust_acc")
    clean = tracking.metric_history(uri, run_id, "val/clean_acc")
    train_s = tracking.metric_history(uri, run_id, "time/train_s")
    cumulative, spent = [], 0.0
    for _, seconds in train_s:
        spent += seconds
        cumulative.append(spent)
    # 2% slack: "the recipe's cost" is one run's measured seconds, and epoch times vary more than that.
    within = [r for (_, r), s in zip(robust, cumulative, strict=False) if budget_s is None or s <= budget_s * 1.02]
    best_epoch = max(range(len(robust)), key=lambda i: robust[i][1]) if robust else None
    return {
        "run": run.data.tags.get(tracking.RUN_NAME_TAG, run.info.run_name),
        "params": {k: run.data.params.get(k) for k in SEARCHED},
        "status": run.data.tags.get("advtrain.stop_reason", run.info.status.lower()),
        "val_clean": [round(v, 4) for _, v in clean],
        "val_robust": [round(v, 4) for _, v in robust],
        "best_epoch": None if best_epoch is None else robust[best_epoch][0],
        "best_val_robust": None if best_epoch is None else robust[best_epoch][1],
        "best_val_clean": None if best_epoch is None else clean[best_epoch][1],
        "train_s": round(spent, 1),
        "robust_within_recipe_cost": max(within) if within else None,
        "test_clean": run.data.metrics.get("test/clean_acc"),
        "test_robust": run.data.metrics.get("test/robust_acc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", required=True, help="the search's name (its MLflow parent run)")
    parser.add_argument("--recipe-run", required=True, help="run name of the hand-written recipe's training run")
    parser.add_argument(
        "--also", nargs="*", default=[], help="more run names to list, e.g. the best config retrained at equal cost"
    )
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlruns)")
    parser.add_argument("--experiment", default="fashion-mnist-linf")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/search_fashion_mnist.json"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks/results/search_fashion_mnist.png"))
    args = parser.parse_args()
    uri = tracking.resolve_tracking_uri(args.tracking_uri, cwd=ROOT)
    parent = tracking.find_run(uri, args.experiment, args.search)
    recipe = tracking.find_run(uri, args.experiment, args.recipe_run)
    for what, found, flag in ((args.search, parent, "--search"), (args.recipe_run, recipe, "--recipe-run")):
        if found is None:
            parser.error(f"no run named {what!r} in experiment {args.experiment!r} at {uri}; check {flag}")
    client = tracking.client_for(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    recipe_row = run_row(uri, recipe, None)
    budget = recipe_row["train_s"]
    rows = sorted((run_row(uri, c.info.run_id, budget) for c in children), key=lambda r: r["run"])
    extra = []
    for name in args.also:
        run_id = tracking.find_run(uri, args.experiment, name)
        if run_id is None:
            parser.error(f"no run named {name!r} in experiment {args.experiment!r} at {uri}; check --also")
        extra.append(run_row(uri, run_id, budget))

    print(
        f"# search {args.search} ({len(rows)} trials) vs recipe run {args.recipe_run}; recipe training {budget:.0f} s"
    )
    print(
        "| run | method | PGD steps | eps ramp (epochs) | val robust by epoch | val clean (best epoch) "
        "| train min | best val robust (epoch) | best within recipe's cost | status |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    for row in [*rows, *extra, recipe_row]:
        params = row["params"]
        ramp = float(params["schedule.eps_ramp_epochs"] or 0)
        within = row["robust_within_recipe_cost"]
        print(
            f"| {row['run']} | {params['method.name']} | {params['attack.num_steps']} | {ramp:.2f} "
            f"| {' '.join(f'{v:.3f}' for v in row['val_robust'])} "
            f"| {row['best_val_clean'] or 0:.3f} | {row['train_s'] / 60:.1f} "
            f"| {row['best_val_robust'] or 0:.3f} ({row['best_epoch']}) "
            f"| {'-' if within is None else f'{within:.3f}'} | {row['status']} |"
        )
    # The search's own plot (as logged on its parent run), redrawn from MLflow with the recipe added.
    plotted = [r for r in [*rows, *extra, recipe_row] if r["val_robust"]]
    labels = {id(recipe_row): "recipe", **{id(r): r["run"].removeprefix(f"{args.search}-") for r in extra}}
    plot_clean_vs_robust(
        [(r["val_clean"][-1], r["val_robust"][-1]) for r in plotted],
        [labels.get(id(r), r["run"].split("_")[-1]) for r in plotted],
        title=f"search {args.search}: {len(rows)} trials, the recipe and --also runs",
        path=Path(args.plot),
    )
    print(f"plot: {args.plot}")
    report = {"search": args.search, "recipe": recipe_row, "trials": rows, "also": extra}
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
