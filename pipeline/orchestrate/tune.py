"""Ray Tune search over a run config's dotted keys (eps schedule, attack steps, method, LR, ...).

Train V2's pattern: Tuner -> one trial driver function per trial, which builds and fits a TorchTrainer
through `run_training` (each trial is itself a distributed run of `scaling.num_workers` workers) -> the
worker loop. ASHA stops weak trials on the per-epoch `objective` (validation robust accuracy, plus
optionally `clean_weight` x clean accuracy). MLflow gets one parent run per search and a child run per
trial; the best config is written as a TOML run file that `advtrain train --config` takes as is.

The search file's schema and validation live in `pipeline.search` (pure, no ray); what a finished
search records (table, best config, plot, registration) in `pipeline.orchestrate.search_report`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from pipeline.config import Config, ConfigError, config_from_dict, to_toml
from pipeline.errors import checked_name
from pipeline.models import is_import_path
from pipeline.models.user import located_code, pack_code, unpack_code

# load_search and format_table are re-exported: the CLI's `tune` command reads the search file and
# prints the table through this module.
from pipeline.orchestrate.cluster import capacity
from pipeline.orchestrate.search_report import SearchSummary, report_search
from pipeline.orchestrate.search_report import format_table as format_table
from pipeline.orchestrate.train import (
    TRIAL_DRIVER_RESOURCE,
    absolute_locations,
    finished_run_record,
    run_training,
    unique_run_name,
)
from pipeline.search import Search, SearchSettings
from pipeline.search import load_search as load_search
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

# Resources of a trial's driver: it only waits on its TorchTrainer, and a whole CPU for it would
# deadlock a 2-CPU machine (1 driver CPU + 2 worker CPUs > 2; shared/NOTES). Tune refuses a bundle of
# 0 CPUs, so drivers hold a custom resource instead: local instances get it from init_ray, a cluster
# from `ray start --resources='{"trial_driver": 100}'` (infra/). Without it, a sliver of a CPU.
TRIAL_DRIVER_CPU = 0.01


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


def _trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    search_name: str,
    parent_run_id: str,
    clean_weight: float,
    code: dict[str, Any] | None = None,
):
    """One trial: a whole distributed training run, named after the trial, reporting to Tune. `code`: a
    user model's package (pipeline.models.user.pack_code), unpacked before the run imports it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    if code is not None:
        unpack_code(code)
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
    init = config.model.init
    if init and not init.startswith(("models:/", "runs:/")) and not Path(init).is_absolute():
        init = str((cwd / init).resolve())
    return config.model_copy(
        update={
            "data": config.data.model_copy(update={"path": str(data_path)}),
            "model": config.model.model_copy(update={"init": init}),
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
    resources = capacity()  # with an autoscaler, what it can grow to: trials wait for their nodes
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
    name = _search_name(config, name, resume=resume, config_name=config_name)
    driver = _driver_resources()
    concurrency = _concurrency(config, search.settings, driver)
    code = _user_code(config, base_dir)
    parent_run_id = _start_parent_run(config, original, search, name)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=config.model_dump(),
            search_name=name,
            parent_run_id=parent_run_id,
            clean_weight=search.settings.clean_weight,
            code=code,
        ),
        driver,
    )
    space = param_space(search)
    log.info("search %s: %d concurrent trial(s), MLflow parent run %s", name, concurrency, parent_run_id)
    try:
        grid = _tuner(config, search, trainable, space, name=name, resume=resume, concurrency=concurrency).fit()
    except BaseException:  # Ctrl-C and worker-group errors alike: the record says FAILED, then re-raise
        tracking.end_run(config.tracking.uri, parent_run_id, status="FAILED")
        raise
    summary = report_search(grid, config, original, search, name=name, parent_run_id=parent_run_id, cwd=base_dir)
    summary.seconds = time.perf_counter() - started
    tracking.end_run(config.tracking.uri, parent_run_id, status="FINISHED")
    return summary


def _user_code(config: Config, base_dir: Path) -> dict[str, Any] | None:
    """A user model's package, packed for the trial drivers (Ray tasks in other folders); None for built-ins."""
    if not is_import_path(config.model.name):
        return None
    return pack_code(located_code(config.model.name, base_dir))


def _search_path(config: Config, name: str) -> str:
    """Where Tune keeps the search's state (what --resume restores from)."""
    return f"{config.run.storage_path.rstrip('/')}/{name}"


MAX_SEARCH_NAME = 100


def _search_name(config: Config, name: str | None, *, resume: bool, config_name: str) -> str:
    """The search's name: the given one to resume (it must exist), else a new one (it must not exist)."""
    storage = config.run.storage_path
    if name is not None:
        # Each trial's run is named `<search>-<trial id>` (12 more characters): that must fit too.
        checked_name(name, "--name")
        if len(name) > MAX_SEARCH_NAME:
            raise ConfigError(f"--name is {len(name)} characters; a search name has at most {MAX_SEARCH_NAME}")
    if resume:
        if not name:
            raise ConfigError("--resume needs the search's name (--name NAME, printed when it started)")
        if not tune.Tuner.can_restore(_search_path(config, name)):
            raise ConfigError(
                f"--resume {name}: no search of that name in {storage}; check --name and run.storage_path"
            )
    name = name or unique_run_name(config_name)
    if not resume and tune.Tuner.can_restore(_search_path(config, name)):
        raise ConfigError(
            f"search '{name}' already exists in {storage}: add --resume to continue it, or pick a new --name"
        )
    return name


def _start_parent_run(config: Config, original: Config, search: Search, name: str) -> str:
    """The search's MLflow parent run (resumed under the same name): the search file as params, the run
    config and the search file as its config artifact. Returns its run id."""
    parent_params = {
        **{f"search.{k}": v for k, v in search.settings.model_dump().items()},
        **{f"asha.{k}": v for k, v in search.asha.model_dump().items()},
        **{f"space.{k}": json.dumps({d: a}) for k, (d, a) in search.space.items()},
    }
    parent_run_id, _ = tracking.start_or_resume_run(
        config.tracking.uri,
        experiment=config.tracking.experiment,
        run_name=name,
        params=parent_params,
        config_toml=to_toml(original) + "\n# search\n" + search.text,
        tags={"advtrain.kind": "search"},
    )
    return parent_run_id


def _tuner(
    config: Config, search: Search, trainable, space: dict[str, Any], *, name: str, resume: bool, concurrency: int
) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored with its unfinished and errored trials to run again."""
    if resume:
        return tune.Tuner.restore(
            _search_path(config, name),
            trainable=trainable,
            param_space=space,
            resume_unfinished=True,
            resume_errored=True,
        )
    return tune.Tuner(
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
        run_config=tune.RunConfig(name=name, storage_path=config.run.storage_path, verbose=0),
    )


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
