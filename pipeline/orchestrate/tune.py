"""Ray Tune search over a run config's dotted keys (eps schedule, attack steps, method, LR, ...).

Train V2's pattern: Tuner -> one trial driver function per trial, which builds and fits a TorchTrainer
through `run_training` (each trial is itself a distributed run of `scaling.num_workers` workers) -> the
worker loop. ASHA stops weak trials on the per-epoch `objective` (validation robust accuracy, plus
optionally `clean_weight` x clean accuracy). MLflow gets one parent run per search and a child run per
trial; the best config is written as a TOML run file that `advtrain train --config` takes as is.

The search file (jobs/configs/search_*.toml):

    [search]                      # all optional
    num_samples = 8               # trials (x the grid's size when the space has grid entries)
    algorithm = "random"          # random | grid | optuna
    clean_weight = 0.0            # objective = val robust acc + clean_weight * val clean acc
    max_concurrent_trials = 0     # 0 = as many as the cluster's CPUs/GPUs fit without waiting
    seed = 0
    register_best = false         # register the best completed trial's model (tracking.registered_model)

    [asha]
    enabled = true
    grace_period = 1              # epochs every trial runs before it can be stopped
    reduction_factor = 2

    [space]
    "attack.eps" = { choice = [0.1, 0.15] }
    "schedule.eps_ramp_epochs" = { randint = [0, 5] }     # inclusive bounds
    "optim.lr" = { loguniform = [1e-4, 1e-2] }
    "method.name" = { grid = ["pgd_at", "trades"] }
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import tune

from pipeline.config import Config, ConfigError, _tables, _unknown, config_from_dict, to_toml
from pipeline.orchestrate.train import (
    TRIAL_DRIVER_RESOURCE,
    absolute_locations,
    finished_run_record,
    run_training,
    unique_run_name,
)
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a search may not vary: they must be equal across trials for the objective to compare trials
# (validation), or they are the search's own business (names, storage, resources, tracking).
FIXED_KEYS = ("run.name", "run.epochs", "run.storage_path", "data.path", "data.loader", "data.memory_limit_mb")
FIXED_TABLES = ("validation", "scaling", "tracking")
# Resources of a trial's driver: it only waits on its TorchTrainer, and a whole CPU for it would
# deadlock a 2-CPU machine (1 driver CPU + 2 worker CPUs > 2; shared/NOTES). Tune refuses a bundle of
# 0 CPUs, so drivers hold a custom resource instead: local instances get it from init_ray, a cluster
# from `ray start --resources='{"trial_driver": 100}'` (infra/). Without it, a sliver of a CPU.
TRIAL_DRIVER_CPU = 0.01
BEST_CONFIG_FILE = "best_config.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SearchSettings(_Strict):
    num_samples: int = Field(default=8, ge=1)
    algorithm: Literal["random", "grid", "optuna"] = "random"
    clean_weight: float = Field(default=0.0, ge=0.0)
    max_concurrent_trials: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)
    register_best: bool = False


class AshaSettings(_Strict):
    enabled: bool = True
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)


@dataclass(frozen=True)
class Search:
    """A validated search file: settings plus the space (dotted key -> (distribution, arguments))."""

    settings: SearchSettings
    asha: AshaSettings
    space: dict[str, tuple[str, list[Any]]]
    text: str = ""


def load_search(path: str | Path, base: Config, *, num_samples: int | None = None) -> Search:
    """Read and check a search file against the run config it varies; raises ConfigError naming the
    problem (unknown key, empty choice, low > high, a value the run config refuses) before any trial."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search file '{path}' not found; examples live in jobs/configs/search_*.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_search(raw, base, num_samples=num_samples, text=path.read_text())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_search(raw: dict[str, Any], base: Config, *, num_samples: int | None = None, text: str = "") -> Search:
    for table in raw:
        if table not in ("search", "asha", "space"):
            raise ConfigError(_unknown(table, ["search", "asha", "space"], "table"))
    try:
        settings = SearchSettings.model_validate(raw.get("search", {}))
        asha = AshaSettings.model_validate(raw.get("asha", {}))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"[search]/[asha]: {problems}") from None
    if num_samples is not None:
        if num_samples < 1:
            raise ConfigError("--num-samples must be at least 1")
        settings = settings.model_copy(update={"num_samples": num_samples})
    space = _flatten_space(raw.get("space", {}))
    if not space:
        raise ConfigError(
            '[space] is empty: give at least one key to search, e.g. "attack.eps" = { choice = [0.1, 0.2] }'
        )
    checked = {key: _check_entry(key, entry, base) for key, entry in space.items()}
    if settings.algorithm == "optuna" and any(d == "grid" for d, _ in checked.values()):
        raise ConfigError("algorithm 'optuna' cannot take grid entries; use choice instead")
    return Search(settings=settings, asha=asha, space=checked, text=text)


def _flatten_space(space: Any) -> dict[str, Any]:
    """[space] as "table.key" = {...} entries, or nested [space.table] key = {...} tables."""
    if not isinstance(space, dict):
        raise ConfigError("[space] must be a table of keys")
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) and "." not in key:
            for inner, entry in value.items():
                flat[f"{key}.{inner}"] = entry
        else:
            flat[key] = value
    return flat


def _check_entry(key: str, entry: Any, base: Config) -> tuple[str, list[Any]]:
    tables = _tables(Config)
    if key.count(".") != 1:
        raise ConfigError(f"space key '{key}' must be table.key, e.g. attack.eps")
    table, name = key.split(".")
    if table not in tables:
        raise ConfigError(_unknown(key, [f"{t}.{k}" for t in tables for k in tables[t].model_fields]))
    if name not in tables[table].model_fields:
        raise ConfigError(_unknown(key, [f"{table}.{k}" for k in tables[table].model_fields]))
    if key in FIXED_KEYS or table in FIXED_TABLES:
        raise ConfigError(
            f"space key '{key}' cannot be searched: it must be the same for every trial "
            "(set it in the run config instead)"
        )
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            f"space.{key} must be one distribution, e.g. {{ choice = [...] }}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    ((dist, args),) = entry.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(_unknown(f"{dist}", list(DISTRIBUTIONS), f"distribution (space.{key})"))
    if not isinstance(args, list):
        raise ConfigError(f"space.{key}.{dist} must be a list, got {args!r}")
    if dist in ("choice", "grid"):
        if not args:
            raise ConfigError(f"space.{key}.{dist} is empty: give at least one value")
        values = args
    else:
        if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"space.{key}.{dist} must be [low, high] numbers, got {args!r}")
        low, high = args
        if low > high:
            raise ConfigError(f"space.{key}.{dist}: low {low} > high {high}")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"space.{key}.loguniform needs low > 0, got {low}")
        if dist == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"space.{key}.randint needs integer bounds, got {args!r}")
        values = [low, high]
    for value in values:
        try:
            config_from_dict(base.model_dump(), {key: value})
        except ConfigError as err:
            raise ConfigError(f"space.{key}: value {value!r} is refused by the run config: {err}") from None
    return dist, list(args)


def param_space(search: Search) -> dict[str, Any]:
    """The Tune param space; keys stay dotted (they are overrides)."""
    grid_all = search.settings.algorithm == "grid"
    out: dict[str, Any] = {}
    for key, (dist, args) in search.space.items():
        if dist == "grid" or (grid_all and dist == "choice"):
            out[key] = tune.grid_search(args)
        elif dist == "choice":
            out[key] = tune.choice(args)
        elif grid_all:
            raise ConfigError(f"algorithm 'grid' takes only choice/grid entries; space.{key} is {dist}")
        elif dist == "uniform":
            out[key] = tune.uniform(*args)
        elif dist == "loguniform":
            out[key] = tune.loguniform(*args)
        else:
            out[key] = tune.randint(args[0], args[1] + 1)  # inclusive bounds for users, exclusive in Tune
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (clean, robust) points no other point beats in both (>= in both and > in one)."""
    return [
        not any((c2 >= c and r2 >= r) and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i)
        for i, (c, r) in enumerate(points)
    ]


# --------------------------------------------------------------------------- running


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


def _trial(params: dict[str, Any], *, base: dict[str, Any], search_name: str, parent_run_id: str, clean_weight: float):
    """One trial: a whole distributed training run, named after the trial, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    name = f"{search_name}-{trial_id}"
    config = config_from_dict(base, {**params, "run.name": name})
    recorded = finished_trial_metrics(config)
    if recorded is not None:
        log.warning(
            "trial %s: its run %s finished before the search was interrupted; reporting what it recorded",
            trial_id,
            name,
        )
        tune.report(recorded)
        return
    run_training(
        config,
        config_name=search_name,
        parent_run_id=parent_run_id,
        extra_tags={"advtrain.search": search_name, "advtrain.trial_id": trial_id},
        callbacks=[TuneReportCallback()],
        objective_clean_weight=clean_weight,
    )


def finished_trial_metrics(config: Config) -> dict[str, float] | None:
    """The last epoch's metrics of a trial whose training run already finished, else None.

    A driver that dies after a trial's run ended but before Tune saved the trial as done leaves it
    pending; the resumed search calls the trial again, and training it again would be refused (the run
    is finished). The trial then reports what its run recorded instead. Its MLflow run is closed here
    too, in case the driver died between the finished marker and closing it.
    """
    record = finished_run_record(config.run.storage_path, config.run.name)
    if record is None:
        return None
    uri, run_id = config.tracking.uri, record["mlflow_run_id"]
    run = tracking.client_for(uri).get_run(run_id)
    if run.info.status == "RUNNING":
        tracking.end_run(uri, run_id, status="FINISHED")
    # A finished run trained every epoch (a stopped one never writes the marker).
    return {
        **{k: v for k, v in run.data.metrics.items() if not k.startswith(("test/", "registered/"))},
        "epoch": config.run.epochs,
    }


def _absolute(config: Config, cwd: Path) -> Config:
    """Trial drivers run in Ray's working folders: every path and the tracking URI made absolute."""
    data_path, storage = absolute_locations(config, cwd)
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"path": str(data_path)}),
            "run": config.run.model_copy(update={"storage_path": storage}),
            "tracking": config.tracking.model_copy(
                update={"uri": tracking.resolve_tracking_uri(config.tracking.uri, cwd=cwd), "registered_model": ""}
            ),
        }
    )


def _driver_resources() -> dict[str, float]:
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1:
        return {"cpu": 0, TRIAL_DRIVER_RESOURCE: 1}
    return {"cpu": TRIAL_DRIVER_CPU}


def _concurrency(config: Config, settings: SearchSettings, driver: dict[str, float]) -> int:
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    resources = ray.cluster_resources()
    per_trial_cpu = config.scaling.num_workers * config.scaling.cpus_per_worker + driver["cpu"]
    fits = int(resources.get("CPU", 0) // per_trial_cpu)
    if config.scaling.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // config.scaling.num_workers))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker} CPU "
            f"(+ GPU: {config.scaling.use_gpu}) but the cluster has {resources.get('CPU', 0)} CPUs and "
            f"{resources.get('GPU', 0)} GPUs (trial drivers need {driver}): lower scaling.num_workers or "
            f"scaling.cpus_per_worker, or give the cluster's nodes a '{TRIAL_DRIVER_RESOURCE}' resource"
        )
    return fits


def run_search(
    config: Config,
    search: Search,
    *,
    name: str | None = None,
    resume: bool = False,
    cwd: str | Path | None = None,
    config_name: str = "search",
) -> SearchSummary:
    """Run (or resume) a search on the connected Ray cluster; returns the table and the best trial."""
    started = time.perf_counter()
    base_dir = Path(cwd or Path.cwd())
    original = config
    config = _absolute(config, base_dir)
    uri = config.tracking.uri
    storage = config.run.storage_path
    search_root = f"{storage.rstrip('/')}"
    if resume:
        if not name:
            raise ConfigError("--resume needs the search's name (--name NAME, printed when it started)")
        if not tune.Tuner.can_restore(f"{search_root}/{name}"):
            raise ConfigError(
                f"--resume {name}: no search of that name in {storage}; check --name and run.storage_path"
            )
    name = name or unique_run_name(config_name)
    if not resume and tune.Tuner.can_restore(f"{search_root}/{name}"):
        raise ConfigError(
            f"search '{name}' already exists in {storage}: add --resume to continue it, or pick a new --name"
        )

    driver = _driver_resources()
    concurrency = _concurrency(config, search.settings, driver)
    parent_params = {
        **{f"search.{k}": v for k, v in search.settings.model_dump().items()},
        **{f"asha.{k}": v for k, v in search.asha.model_dump().items()},
        **{f"space.{k}": json.dumps({d: a}) for k, (d, a) in search.space.items()},
    }
    parent_run_id, _ = tracking.start_or_resume_run(
        uri,
        experiment=config.tracking.experiment,
        run_name=name,
        params=parent_params,
        config_toml=to_toml(original) + "\n# search\n" + search.text,
        tags={"advtrain.kind": "search"},
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=config.model_dump(),
            search_name=name,
            parent_run_id=parent_run_id,
            clean_weight=search.settings.clean_weight,
        ),
        driver,
    )
    space = param_space(search)
    log.info("search %s: %d concurrent trial(s), MLflow parent run %s", name, concurrency, parent_run_id)
    try:
        if resume:
            tuner = tune.Tuner.restore(
                f"{search_root}/{name}",
                trainable=trainable,
                param_space=space,
                resume_unfinished=True,
                resume_errored=True,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=search.settings.num_samples,
                    # The limit lives in the search algorithm: Tune applies max_concurrent_trials only to
                    # Searchers, and silently not to a BasicVariantGenerator passed in.
                    max_concurrent_trials=None,
                    scheduler=_scheduler(config, search),
                    search_alg=_search_alg(search, concurrency),
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
            )
        grid = tuner.fit()
    except BaseException:
        tracking.end_run(uri, parent_run_id, status="FAILED")
        raise
    summary = _summarise(grid, config, search, name=name, parent_run_id=parent_run_id, uri=uri)
    summary.best_config_path = _write_best(summary, original, base_dir, storage, name, uri, parent_run_id)
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
    summary.seconds = time.perf_counter() - started
    tracking.end_run(uri, parent_run_id, status="FINISHED")
    return summary


def _scheduler(config: Config, search: Search):
    if not search.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        metric="objective",
        mode="max",
        # One more than the epochs: at max_t ASHA stops every trial, which would kill a trial at its last
        # report, before its run logs the model.
        max_t=config.run.epochs + 1,
        grace_period=min(search.asha.grace_period, config.run.epochs),
        reduction_factor=search.asha.reduction_factor,
    )


def _search_alg(search: Search, concurrency: int):
    if search.settings.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(
            OptunaSearch(metric="objective", mode="max", seed=search.settings.seed), max_concurrent=concurrency
        )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.settings.seed, max_concurrent=concurrency)


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
    return tracking.register_run_model(
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
