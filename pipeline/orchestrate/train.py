"""Ray Train's driver side: `run_training` validates, names the run, opens its MLflow run and fits a
TorchTrainer whose workers run pipeline/orchestrate/worker.py.

Paths and the tracking URI are resolved to absolute ones here (Ray workers chdir elsewhere) and the
data is validated once. Resuming — after Ray restarts the worker group (FailureConfig) or when a run
with the same name is submitted again — starts after the last committed checkpoint, and MLflow keeps
exactly one value per epoch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, flat_params, to_toml
from pipeline.errors import checked_name
from pipeline.orchestrate.cluster import TRIAL_DRIVER_RESOURCE, check_gpus, check_ray_data_cpus, init_ray
from pipeline.orchestrate.model_setup import ModelSetup, check_model
from pipeline.orchestrate.storage import (
    FINISHED_MARKER,
    absolute_locations,
    finished_run_record,
    run_state,
    unique_run_name,
    write_finished_record,
)
from pipeline.orchestrate.worker import train_worker_loop
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

# Importers of the driver find the cluster and storage helpers here too.
__all__ = [
    "FINISHED_MARKER",
    "TRIAL_DRIVER_RESOURCE",
    "TrainSummary",
    "absolute_locations",
    "choose_loader",
    "finished_run_record",
    "init_ray",
    "run_training",
    "unique_run_name",
]


@dataclass(frozen=True)
class TrainSummary:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    resumed: bool
    epochs: int
    val_clean_acc: float
    val_robust_acc: float
    registered_epoch: int
    test_clean_acc: float
    test_robust_acc: float
    registered_model: str
    model_version: int | None
    weights_sha256: str
    storage: str
    seconds: float


def choose_loader(config: Config, info: data_lib.DatasetInfo) -> str:
    if config.data.loader != "auto":
        return config.data.loader
    # Measured: in-memory shards are faster per epoch than Ray Data streaming on data that fits, 20-70x
    # with plain steps (shared/NOTES), 1.16x with FGSM-RS steps (benchmarks/RESULTS.md), and streaming
    # needs spare CPUs for its read tasks; so stream only what does not fit.
    size_mb = data_lib.train_bytes_as_float(info) / 2**20
    return "memory" if size_mb <= config.data.memory_limit_mb else "ray_data"


@dataclass(frozen=True)
class _Run:
    """A run about to be fitted: its config with absolute locations and its name, its storage state."""

    config: Config
    name: str
    storage: str
    state: str
    info: data_lib.DatasetInfo
    loader: str
    model: ModelSetup

    @property
    def arch(self) -> dict[str, Any]:
        return self.model.arch


def _resolve_run(config: Config, *, config_name: str, resume: str | None, base: Path) -> _Run:
    """Validate the data, name the run and check that the name fits what is asked (new or resumed)."""
    if resume is not None:
        checked_name(resume, "--resume")
    data_path, storage = absolute_locations(config, base)
    info = data_lib.validate_dataset(data_path)
    name = resume or config.run.name or unique_run_name(config_name)
    state = run_state(storage, name)
    if state == "finished":
        raise ConfigError(
            f"run '{name}' already finished (in {storage}); pick a new run.name or leave it empty for a unique one"
        )
    if resume and state != "resumable":
        raise ConfigError(
            f"--resume {name}: no checkpoint of that run in {storage}; check the name and run.storage_path"
        )
    model = check_model(config, info, base=base, storage=storage, run_name=name)
    config = config.model_copy(
        update={
            "run": config.run.model_copy(update={"name": name, "storage_path": storage}),
            "data": config.data.model_copy(update={"path": str(data_path)}),
            "model": config.model.model_copy(update={"init": model.init}),
        }
    )
    return _Run(config, name, storage, state, info, choose_loader(config, info), model)


def _open_mlflow_run(run: _Run, uri: str, *, parent_run_id: str | None, extra_tags: dict[str, str] | None):
    """Create the run's MLflow run, or reopen it when the run resumes; (run id, whether it was reopened)."""
    config = run.config
    return tracking.start_or_resume_run(
        uri,
        experiment=config.tracking.experiment,
        run_name=run.name,
        params={**flat_params(config), "data.loader_used": run.loader},
        config_toml=to_toml(config),
        tags={
            "advtrain.dataset": run.info.source,
            "advtrain.threat_model": f"{config.attack.norm} eps={config.attack.eps}",
            "advtrain.method": config.method.name,
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            **(extra_tags or {}),
        },
    )


# Variables the training workers get from the driver's environment: NCCL's and torch's NCCL settings
# (interface, InfiniBand, debug level, timeouts) are per cluster, and the process group reads them at start,
# before the worker function could set them.
FORWARDED_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The training workers' environment variables: ours, plus every NCCL setting of the driver's."""
    environ = dict(os.environ) if environ is None else environ
    forwarded = {key: value for key, value in environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    return {**forwarded, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _torch_trainer(run: _Run, worker_context: dict[str, Any], callbacks: list | None) -> TorchTrainer:
    config = run.config
    datasets = None
    if run.loader == "ray_data":
        check_ray_data_cpus(config)
        files = [str(p) for p in run.info.files("train")]
        info = run.info
        decoded = ray.data.read_parquet(files).map_batches(  # our files hold only image and label
            data_lib.decode_columns,
            fn_kwargs={"shape": info.shape, "num_classes": info.num_classes, "encoded": info.encoded},
            batch_format="pyarrow",  # raw pixels straight from Arrow's buffer, no Python object per row
        )
        datasets = {"train": decoded}
    return TorchTrainer(
        train_worker_loop,
        train_loop_config=worker_context,
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines drown the per-epoch progress lines.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )


def run_training(
    config: Config,
    *,
    config_name: str = "run",
    resume: str | None = None,
    cwd: str | Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    objective_clean_weight: float = 0.0,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> TrainSummary:
    """Fit the run described by `config` on the Ray cluster at `ray_address` (else the connected one,
    RAY_ADDRESS or a local instance of `num_cpus`), started only once the run's data, names, model and
    tracking server are checked.

    `resume=NAME` requires that run to exist; a config `run.name` that exists resumes it; an empty name
    gets a unique one, so a run can never overwrite another by accident. A search's trial passes its
    parent MLflow run, Tune's report callback and the objective's clean-accuracy weight (every epoch
    reports `objective = val robust + weight * val clean`).
    """
    started, started_unix = time.perf_counter(), time.time()
    base = Path(cwd or Path.cwd())
    check_gpus(config, ray_address)  # a local instance's GPUs are known before anything starts
    run = _resolve_run(config, config_name=config_name, resume=resume, base=base)
    config = run.config
    uri = tracking.resolve_tracking_uri(config.tracking.uri, cwd=base)
    tracking.client_for(uri)  # an unreachable server is named before Ray starts
    init_ray(ray_address, num_cpus=num_cpus)
    check_gpus(config, ray_address)  # a cluster's, once connected; before the MLflow run records anything
    run_id, mlflow_resumed = _open_mlflow_run(run, uri, parent_run_id=parent_run_id, extra_tags=extra_tags)
    info, arch = run.info, run.arch
    resumed_note = " (resumed)" if run.state == "resumable" else ""
    log.info("run %s: %s loader, MLflow run %s%s", run.name, run.loader, run_id, resumed_note)
    worker_context = {
        "config": config.model_dump(),
        "architecture": arch,
        "code": run.model.code,  # a user model's package, unpacked by each worker before it builds the model
        "loader": run.loader,
        "tracking_uri": uri,
        "run_id": run_id,
        "dataset_source": info.source,
        "objective_clean_weight": objective_clean_weight,
        "driver_started_unix": started_unix,
    }
    try:
        result = _torch_trainer(run, worker_context, callbacks).fit()
    except BaseException:  # Ctrl-C and worker-group errors alike: the record says FAILED, then re-raise
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    summary: dict[str, Any] = result.return_value
    write_finished_record(run.storage, run.name, {"mlflow_run_id": run_id, **summary})
    tracking.end_run(uri, run_id, status="FINISHED")
    return TrainSummary(
        run_name=run.name,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        resumed=run.state == "resumable" or mlflow_resumed,
        epochs=config.run.epochs,
        val_clean_acc=summary["val/clean_acc"],
        val_robust_acc=summary["val/robust_acc"],
        registered_epoch=summary["registered_epoch"],
        test_clean_acc=summary["test/clean_acc"],
        test_robust_acc=summary["test/robust_acc"],
        registered_model=config.tracking.registered_model,
        model_version=summary["model_version"],
        weights_sha256=summary["weights_sha256"],
        storage=f"{run.storage}/{run.name}",
        seconds=time.perf_counter() - started,
    )
