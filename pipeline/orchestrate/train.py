"""Ray Train glue: the driver (`run_training`) and the per-worker loop (`train_worker_loop`).

Driver: resolves every path and the tracking URI to absolute ones (Ray workers chdir elsewhere),
validates the data once, names the run, creates/reopens its MLflow run and fits a TorchTrainer.
Workers: read their shard, attack it on their own unwrapped replica, train under DDP, validate, and
checkpoint every epoch (rank 0 writes, every rank reports). Resuming — after Ray restarts the worker
group (FailureConfig) or when a run with the same name is submitted again — starts after the last
committed checkpoint, and MLflow keeps exactly one value per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, flat_params, to_toml
from pipeline.models import architecture
from pipeline.tracking import runs as tracking
from pipeline.training import LocalWorld, Trainer
from pipeline.training.world import STATE_FILE

log = logging.getLogger(__name__)

FINISHED_MARKER = "advtrain_finished.json"
SENTINEL_METRIC = "train/loss"
TRIAL_DRIVER_RESOURCE = "trial_driver"
RESTARTS_TAG = "advtrain.restarts"


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


# --------------------------------------------------------------------------- driver


def _storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _fs_and_path(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def absolute_locations(config: Config, base: Path) -> tuple[Path, str]:
    """(data path, storage URI) resolved against `base`: Ray processes run in other working folders."""
    data_path = Path(config.data.path)
    data_path = data_path if data_path.is_absolute() else (base / data_path).resolve()
    storage = config.run.storage_path
    return data_path, _storage_uri(storage if "://" in storage else str(base / storage))


def _run_dir(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    fs, base = _fs_and_path(storage)
    return fs, f"{base.rstrip('/')}/{name}"


def _run_state(storage: str, name: str) -> str:
    """'new', 'resumable' (has checkpoints) or 'finished'."""
    fs, run_dir = _run_dir(storage, name)
    if fs.get_file_info(f"{run_dir}/{FINISHED_MARKER}").type == pyarrow.fs.FileType.File:
        return "finished"
    if fs.get_file_info(run_dir).type != pyarrow.fs.FileType.Directory:
        return "new"
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir))
    has_checkpoint = any(Path(e.path).name.startswith("checkpoint_") for e in entries)
    return "resumable" if has_checkpoint else "new"


def finished_run_record(storage: str, name: str) -> dict[str, Any] | None:
    """What a finished run wrote at its end (its MLflow run id and summary), or None if it has not finished."""
    fs, run_dir = _run_dir(storage, name)
    try:
        with fs.open_input_stream(f"{run_dir}/{FINISHED_MARKER}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def unique_run_name(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def choose_loader(config: Config, info: data_lib.DatasetInfo) -> str:
    if config.data.loader != "auto":
        return config.data.loader
    # Measured: in-memory shards are faster per epoch than Ray Data streaming on data that fits, 20-70x
    # with plain steps (shared/NOTES), 1.16x with FGSM-RS steps (benchmarks/RESULTS.md), and streaming
    # needs spare CPUs for its read tasks; so stream only what does not fit.
    size_mb = data_lib.train_bytes_as_float(info) / 2**20
    return "memory" if size_mb <= config.data.memory_limit_mb else "ray_data"


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
) -> TrainSummary:
    """Fit the run described by `config` on the connected Ray cluster (ray.init first).

    `resume=NAME` requires that run to exist; a config `run.name` that exists resumes it; an empty name
    gets a unique one, so a run can never overwrite another by accident. A search's trial passes its
    parent MLflow run, Tune's report callback and the objective's clean-accuracy weight (every epoch
    reports `objective = val robust + weight * val clean`).
    """
    started, started_unix = time.perf_counter(), time.time()
    base = Path(cwd or Path.cwd())
    data_path, storage = absolute_locations(config, base)
    info = data_lib.validate_dataset(data_path)
    name = resume or config.run.name or unique_run_name(config_name)
    state = _run_state(storage, name)
    if state == "finished":
        raise ConfigError(
            f"run '{name}' already finished (in {storage}); pick a new run.name or leave it empty for a unique one"
        )
    if resume and state != "resumable":
        raise ConfigError(
            f"--resume {name}: no checkpoint of that run in {storage}; check the name and run.storage_path"
        )
    config = config.model_copy(
        update={
            "run": config.run.model_copy(update={"name": name, "storage_path": storage}),
            "data": config.data.model_copy(update={"path": str(data_path)}),
        }
    )
    loader = choose_loader(config, info)
    uri = tracking.resolve_tracking_uri(config.tracking.uri, cwd=base)
    run_id, mlflow_resumed = tracking.start_or_resume_run(
        uri,
        experiment=config.tracking.experiment,
        run_name=name,
        params={**flat_params(config), "data.loader_used": loader},
        config_toml=to_toml(config),
        tags={
            "advtrain.dataset": info.source,
            "advtrain.threat_model": f"{config.attack.norm} eps={config.attack.eps}",
            "advtrain.method": config.method.name,
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            **(extra_tags or {}),
        },
    )
    arch = architecture(config.model, shape=info.shape, num_classes=info.num_classes, mean=info.mean, std=info.std)
    log.info("run %s: %s loader, MLflow run %s%s", name, loader, run_id, " (resumed)" if state == "resumable" else "")
    worker_context = {
        "config": config.model_dump(),
        "architecture": arch,
        "loader": loader,
        "tracking_uri": uri,
        "run_id": run_id,
        "dataset_source": info.source,
        "objective_clean_weight": objective_clean_weight,
        "driver_started_unix": started_unix,
    }
    datasets = None
    if loader == "ray_data":
        _check_ray_data_cpus(config)
        datasets = {"train": ray.data.read_parquet([str(p) for p in info.files("train")], columns=["image", "label"])}
    trainer = TorchTrainer(
        train_worker_loop,
        train_loop_config=worker_context,
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines drown the per-epoch progress lines.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}},
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    summary: dict[str, Any] = result.return_value
    fs, run_dir = _run_dir(storage, name)
    with fs.open_output_stream(f"{run_dir}/{FINISHED_MARKER}") as f:
        f.write(json.dumps({"mlflow_run_id": run_id, **summary}).encode())
    tracking.end_run(uri, run_id, status="FINISHED")
    return TrainSummary(
        run_name=name,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        resumed=state == "resumable" or mlflow_resumed,
        epochs=config.run.epochs,
        val_clean_acc=summary["val/clean_acc"],
        val_robust_acc=summary["val/robust_acc"],
        registered_epoch=summary["registered_epoch"],
        test_clean_acc=summary["test/clean_acc"],
        test_robust_acc=summary["test/robust_acc"],
        registered_model=config.tracking.registered_model,
        model_version=summary["model_version"],
        weights_sha256=summary["weights_sha256"],
        storage=f"{storage}/{name}",
        seconds=time.perf_counter() - started,
    )


def _check_ray_data_cpus(config: Config) -> None:
    total = ray.cluster_resources().get("CPU", 0)
    used = config.scaling.num_workers * config.scaling.cpus_per_worker
    if used > total - 0.5:
        raise ConfigError(
            f"data.loader 'ray_data' needs CPU left for Ray Data's read tasks, but {config.scaling.num_workers} "
            f"workers x {config.scaling.cpus_per_worker} CPU use {used} of the cluster's {total}: lower "
            "scaling.cpus_per_worker (e.g. 0.5) or use data.loader = 'memory'"
        )


# --------------------------------------------------------------------------- workers


class RayWorld:
    """A Ray Train worker as the Trainer's world: rank and device from Ray, DDP by prepare_model, gloo/nccl
    collectives, checkpoints through ray.train.report."""

    def __init__(self, arch: dict[str, Any]) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shape, self.num_classes = tuple(arch["shape"]), arch["num_classes"]
        self.local = LocalWorld(self.device)  # the collectives of the process group Ray Train set up

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self.local.all_reduce_sum(values)

    def all_gather_object(self, value: Any) -> list[Any]:
        return self.local.all_gather_object(value)

    def load_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            # weights_only=True: a checkpoint is data, never code.
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)

    def commit(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(metrics)  # every rank reports equally often, or training hangs
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def streamed_batches(self, batch_size: int):
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * batch_size
        ):
            yield data_lib.decode_batch(batch["image"], batch["label"], self.shape, self.num_classes)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class MLflowReporter:
    """Rank 0's records on the run's MLflow run (explicit run id): epochs, events, tags, the model."""

    def __init__(self, config: Config, ctx: dict[str, Any]) -> None:
        self.config, self.uri, self.run_id = config, ctx["tracking_uri"], ctx["run_id"]
        self.arch, self.dataset_source = ctx["architecture"], ctx["dataset_source"]

    def logged_epochs(self) -> set[int]:
        return tracking.logged_epochs(self.uri, self.run_id, SENTINEL_METRIC)

    def start(self, *, node_ids: list[str], precisions: list[str], resumed_from: int | None) -> None:
        # Where the ranks run (node ids, one per rank): multi-node placement is visible in MLflow, and
        # changes after a node loss show in the tag of the latest worker group.
        tags = {"advtrain.worker_nodes": json.dumps(node_ids), "advtrain.mixed_precision": ",".join(precisions)}
        tracking.set_tags(self.uri, self.run_id, tags)
        if resumed_from is not None:
            # Every restart (a replaced worker group or a resubmission) is on the run: when, from which
            # epoch, on which nodes. Operators read recovery times from it; tests assert the epoch.
            restarts = json.loads(tracking.run_tags(self.uri, self.run_id).get(RESTARTS_TAG, "[]"))
            restarts.append({"from_epoch": resumed_from, "unix_time": time.time(), "worker_nodes": node_ids})
            tracking.record_event(self.uri, self.run_id, RESTARTS_TAG, restarts, epoch=resumed_from, metrics={})

    def log_epoch(self, metrics: dict[str, float], *, epoch: int) -> None:
        tracking.log_epoch(self.uri, self.run_id, metrics, epoch=epoch)

    def event(self, name: str, events: list[dict[str, Any]], *, epoch: int, metrics: dict[str, float]) -> None:
        tracking.record_event(self.uri, self.run_id, name, events, epoch=epoch, metrics=metrics)

    def finish(
        self, model: torch.nn.Module, *, registered_epoch: int, chosen: dict[str, float], test: dict[str, float]
    ) -> dict[str, Any]:
        """Log the test metrics, then register the model (safetensors + architecture, no pickle)."""
        config = self.config
        registered_metrics = {"registered/epoch": float(registered_epoch)}
        registered_metrics["registered/val_robust_acc"] = chosen["val/robust_acc"]
        self.log_epoch({**test, **registered_metrics}, epoch=config.run.epochs)
        registered = tracking.log_and_register_model(
            self.uri,
            self.run_id,
            model=model,
            arch=self.arch,
            registered_model=config.tracking.registered_model,
            alias=config.tracking.alias,
            version_tags={
                "dataset": self.dataset_source,
                "threat_model.norm": config.attack.norm,
                "threat_model.eps": config.attack.eps,
                "method": config.method.name,
                "test_clean_acc": test["test/clean_acc"],
                "epoch": registered_epoch,
                "val_robust_acc": chosen["val/robust_acc"],
                "val_robust_protocol": f"pgd-{config.validation.num_steps} x{config.validation.num_restarts} restarts",
            },
        )
        tags = {"advtrain.weights_sha256": registered["weights_sha256"]}
        tags["advtrain.registered_epoch"] = str(registered_epoch)
        tracking.set_tags(self.uri, self.run_id, tags)
        return {"model_version": registered["version"], "weights_sha256": registered["weights_sha256"]}


def _quiet_report_logging() -> None:
    """Ray Train logs every report at INFO ("Reporting training result ...") from a logger named after
    its module's file; the per-epoch line of rank 0 says the same, readably."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray version with another layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_worker_loop(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker: the one Trainer in a Ray world with an MLflow reporter. Returns
    rank 0's summary (the driver reads result.return_value)."""
    entered = time.time()
    config = Config.model_validate(ctx["config"])
    world = RayWorld(ctx["architecture"])
    if world.rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    _quiet_report_logging()
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch's intra-op pool match explicitly.
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    trainer = Trainer(
        config,
        world,
        MLflowReporter(config, ctx),
        architecture=ctx["architecture"],
        loader=ctx["loader"],
        objective_clean_weight=ctx.get("objective_clean_weight", 0.0),
        to_worker_s=entered - ctx["driver_started_unix"],
        entered_unix=entered,
    )
    return trainer.run()


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (address / RAY_ADDRESS) or start a local instance; quiet, fast settings."""
    if ray.is_initialized():
        return
    for key, value in {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Train V2's controller takes one report per health check (every 2 s by default) and a worker's
        # next report blocks until then: epochs shorter than 2 s each waited for it (a digits epoch is
        # 0.5 s). Measured: 8 epochs in 30.7 s -> 17.8 s. Inherited by a local instance's processes.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Loopback only: a local instance has no business on the machine's network interfaces. The
        # dashboard is what lets Ray free stopped runs' placement groups (shared/NOTES).
        ray.init(
            # "local": a new instance even when a `ray start` cluster on this machine (or a stale pointer
            # to one in /tmp/ray) exists; clusters are joined only through an explicit address.
            address="local",
            num_cpus=num_cpus,
            # Tune trial drivers hold this instead of a CPU (pipeline/orchestrate/tune.py): a trial that only waits on
            # its TorchTrainer must not take a CPU its own workers need.
            resources={TRIAL_DRIVER_RESOURCE: 1000},
            include_dashboard=True,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
        )
