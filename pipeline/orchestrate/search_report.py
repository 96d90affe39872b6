"""What a finished search leaves behind: the per-trial table, the best trial's config as a TOML run
file, the clean-vs-robust plot, the best model's registration and the parent run's totals.

Reads Tune's results and the trials' MLflow runs; no ray import (a ResultGrid is only iterated).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_from_dict, to_toml
from pipeline.search import Search
from pipeline.tracking import model_store
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

BEST_CONFIG_FILE = "best_config.toml"


@dataclass
class TrialRow:
    trial_id: str
    run_name: str
    params: dict[str, Any]
    clean: float | None
    robust: float | None
    objective: float | None
    epochs_run: int
    status: str
    mlflow_run_id: str | None = None


@dataclass
class SearchSummary:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    best_objective: float | None = None  # the best trial's best epoch (the one its run registers)
    best_config_path: str = ""
    registered_version: int | None = None
    seconds: float = 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (clean, robust) points no other point beats in both (>= in both and > in one)."""
    return [
        not any((c2 >= c and r2 >= r) and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i)
        for i, (c, r) in enumerate(points)
    ]


def report_search(
    grid, config: Config, original: Config, search: Search, *, name: str, parent_run_id: str, cwd: Path
) -> SearchSummary:
    """Summarise a fitted search and record it on its MLflow parent run (which stays open).

    `config` is the search's config with absolute paths and tracking URI; `original` the user's, which
    the best config is written from. Writes the best config under the search's storage (or `cwd`/runs
    when storage is remote) and, with `register_best`, registers the best completed trial's model.
    """
    uri = config.tracking.uri
    summary = _summarise(grid, config, search, name=name, parent_run_id=parent_run_id, uri=uri)
    summary.best_config_path = _write_best(summary, original, cwd, config.run.storage_path, name, uri, parent_run_id)
    _log_plot(summary, uri, parent_run_id)
    if search.settings.register_best and original.tracking.registered_model and summary.best:
        summary.registered_version = _register_best(summary, original, uri)
    tracking.log_epoch(
        uri,
        parent_run_id,
        {
            "best/objective": summary.best_objective if summary.best_objective is not None else float("nan"),
            "trials/completed": sum(r.status == "completed" for r in summary.rows),
            "trials/stopped_early": sum(r.status.startswith("stopped") for r in summary.rows),
            "trials/errored": sum(r.status.startswith("error") for r in summary.rows),
        },
        epoch=0,
    )
    return summary


def _summarise(grid, config: Config, search: Search, *, name: str, parent_run_id: str, uri: str) -> SearchSummary:
    summary = SearchSummary(name=name, parent_run_id=parent_run_id, tracking_uri=uri)
    best_score: dict[str, float] = {}  # trial -> its best epoch's objective (the epoch its run registers)
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = {k: result.config[k] for k in search.space if k in result.config}
        run_name = f"{name}-{trial_id}"
        run_id = tracking.find_run(uri, config.tracking.experiment, run_name)
        # Epochs trained = epochs its run logged (each after its checkpoint committed); Tune's own count
        # can be one short, as a stopped trial's workers may finish the epoch they were in.
        objective_history = tracking.metric_history(uri, run_id, "objective") if run_id else []
        epochs_run = len(objective_history) or int(metrics.get("training_iteration", 0) or 0)
        # Completed = the trial's training run got to its end (test metrics, model logged): run_training
        # closes its MLflow run then. ASHA may stop a trial at any rung, even at its last epoch.
        finished = run_id is not None and tracking.client_for(uri).get_run(run_id).info.status == "FINISHED"
        if result.error is not None:
            status = f"error: {str(result.error).strip().splitlines()[-1][:200]}"
        elif finished:
            status = "completed"
        else:
            status = f"stopped by ASHA after epoch {epochs_run}"
        row = TrialRow(
            trial_id=trial_id,
            run_name=run_name,
            params=params,
            clean=metrics.get("val/clean_acc"),
            robust=metrics.get("val/robust_acc"),
            objective=metrics.get("objective"),
            epochs_run=epochs_run,
            status=status,
            mlflow_run_id=run_id,
        )
        summary.rows.append(row)
        if objective_history and result.error is None:
            best_score[trial_id] = max(v for _, v in objective_history)
        if row.mlflow_run_id:
            tracking.set_tags(uri, row.mlflow_run_id, {"advtrain.stop_reason": status})
            if status != "completed":
                tracking.end_run(uri, row.mlflow_run_id, status="FAILED" if status.startswith("error") else "KILLED")
    summary.rows.sort(key=lambda r: r.trial_id)
    # Best by the objective at the trial's registered epoch (its best): the max reported objective.
    scored = [r for r in summary.rows if r.trial_id in best_score]
    if best_score:
        pool = [r for r in scored if r.status == "completed"] or scored
        summary.best = max(pool, key=lambda r: (best_score[r.trial_id], r.trial_id))
        summary.best_objective = best_score[summary.best.trial_id]
    return summary


def _write_best(
    summary: SearchSummary, original: Config, cwd: Path, storage: str, name: str, uri: str, parent: str
) -> str:
    if summary.best is None:
        return ""
    best = config_from_dict(original.model_dump(), {**summary.best.params, "run.name": ""})
    text = (
        f"# Best trial {summary.best.trial_id} of search {name} (best-epoch objective {summary.best_objective:.4f}).\n"
        f"# Train it for real: advtrain train --config <this file>\n" + to_toml(best)
    )
    folder = cwd / "runs" / name if "://" in storage else Path(storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BEST_CONFIG_FILE
    path.write_text(text)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / BEST_CONFIG_FILE
        copy.write_text(text)
        tracking.log_artifacts(uri, parent, tmp, "search")
    return str(path)


def _log_plot(summary: SearchSummary, uri: str, parent: str) -> None:
    rows = [r for r in summary.rows if r.clean is not None and r.robust is not None]
    if not rows:
        return
    with tempfile.TemporaryDirectory() as tmp:
        plot_clean_vs_robust(
            [(float(r.clean), float(r.robust)) for r in rows],
            [r.trial_id.split("_")[-1] for r in rows],
            title=f"search {summary.name}: {len(rows)} trials",
            path=Path(tmp) / "clean_vs_robust.png",
        )
        (Path(tmp) / "trials.json").write_text(json.dumps([r.__dict__ for r in summary.rows], indent=2, default=str))
        tracking.log_artifacts(uri, parent, tmp, "search")


def plot_clean_vs_robust(points: list[tuple[float, float]], labels: list[str], *, title: str, path: Path) -> None:
    """Clean vs robust accuracy, one labelled point per trial (last epoch), the Pareto front in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([c for c, _ in points], [r for _, r in points], c=["tab:red" if f else "tab:gray" for f in front])
    for label, (c, r) in zip(labels, points, strict=True):
        ax.annotate(label, (c, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = sorted(p for p, f in zip(points, front, strict=True) if f)
    ax.plot([c for c, _ in frontier], [r for _, r in frontier], color="tab:red", label="Pareto front")
    ax.set_xlabel("validation clean accuracy (last epoch)")
    ax.set_ylabel("validation robust accuracy (last epoch)")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _register_best(summary: SearchSummary, original: Config, uri: str) -> int | None:
    best = summary.best
    if best is None or best.status != "completed" or not best.mlflow_run_id:
        log.warning("no completed trial to register (the best trial was stopped early)")
        return None
    run = tracking.client_for(uri).get_run(best.mlflow_run_id)
    params, metrics = run.data.params, run.data.metrics
    # The same tags a training run's own registration writes, so promotion's gates read them alike.
    tags = {
        "dataset": run.data.tags.get("advtrain.dataset", ""),
        "threat_model.norm": params["attack.norm"],
        "threat_model.eps": params["attack.eps"],
        "method": params["method.name"],
        "test_clean_acc": metrics.get("test/clean_acc", ""),
        "epoch": int(metrics.get("registered/epoch", 0)),
        "val_robust_acc": metrics.get("registered/val_robust_acc", ""),
        "search": summary.name,
        "trial_id": best.trial_id,
        **{f"search.{k}": v for k, v in best.params.items()},
    }
    return model_store.register_run_model(
        uri,
        best.mlflow_run_id,
        registered_model=original.tracking.registered_model,
        alias=original.tracking.alias,
        tags=tags,
    )


def format_table(summary: SearchSummary) -> str:
    keys = sorted({k for r in summary.rows for k in r.params})
    header = ["trial", *keys, "clean", "robust", "objective", "epochs", "status"]
    lines = [header]
    for r in summary.rows:
        lines.append(
            [
                r.trial_id.split("_")[-1] + (" *" if summary.best and r.trial_id == summary.best.trial_id else ""),
                *[_short(r.params.get(k)) for k in keys],
                _short(r.clean),
                _short(r.robust),
                _short(r.objective),
                str(r.epochs_run),
                r.status,
            ]
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if not math.isnan(value) else "nan"
    return str(value)
