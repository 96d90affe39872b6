"""What runs on every Ray Train worker: the one `Trainer` in a Ray world (rank, device, DDP, collectives,
checkpoints through ray.train.report) with an MLflow reporter (rank 0's records)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pipeline import data as data_lib
from pipeline.config import Config
from pipeline.models.user import unpack_code
from pipeline.tracking import model_store
from pipeline.tracking import runs as tracking
from pipeline.training import LocalWorld, Trainer
from pipeline.training.world import STATE_FILE

SENTINEL_METRIC = "train/loss"
RESTARTS_TAG = "advtrain.restarts"


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
        """Batches decoded by Ray Data's map tasks (pipeline.data.decode_columns), prefetched and moved
        onto this worker's device as uint8, made float there."""
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8, "label": torch.int64},
            device=self.device,
            prefetch_batches=2,
            local_shuffle_buffer_size=4 * batch_size,
        ):
            yield data_lib.to_float(batch["image"]), batch["label"]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class MLflowReporter:
    """Rank 0's records on the run's MLflow run (explicit run id): epochs, events, tags, the model."""

    def __init__(self, config: Config, ctx: dict[str, Any]) -> None:
        self.config, self.uri, self.run_id = config, ctx["tracking_uri"], ctx["run_id"]
        self.arch, self.dataset_source = ctx["architecture"], ctx["dataset_source"]
        self.system_metrics = None

    def logged_epochs(self) -> set[int]:
        return tracking.logged_epochs(self.uri, self.run_id, SENTINEL_METRIC)

    def start(
        self, *, node_ids: list[str], precisions: list[str], devices: list[str], resumed_from: int | None
    ) -> None:
        # Where the ranks run (node ids, one per rank): multi-node placement is visible in MLflow, and
        # changes after a node loss show in the tag of the latest worker group.
        tags = {"advtrain.worker_nodes": json.dumps(node_ids), "advtrain.mixed_precision": ",".join(precisions)}
        tags["advtrain.devices"] = json.dumps(devices)  # each rank's device: "cuda:0 (NVIDIA H100 ..., 9.0)" or "cpu"
        tracking.set_tags(self.uri, self.run_id, tags)
        # Rank 0's node: its CPUs and every GPU it holds (one pod per node holds all the node's GPUs).
        self.system_metrics = tracking.start_system_metrics(
            self.uri,
            self.run_id,
            interval_s=self.config.tracking.system_metrics_interval_s,
            resume=resumed_from is not None,
        )
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
        registered = model_store.log_and_register_model(
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
        if self.system_metrics is not None:
            self.system_metrics.finish()  # flushes the last samples while the run is still RUNNING
        return {"model_version": registered["version"], "weights_sha256": registered["weights_sha256"]}


def _quiet_report_logging() -> None:
    """Ray Train logs every report at INFO ("Reporting training result ...") from a logger named after
    its module's file; the per-epoch line of rank 0 says the same, readably. MLflow's system-metrics
    monitor is quieted too."""
    # It announces its start and stop (and "no GPU") at INFO on every run.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray version with another layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_worker_loop(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker: the one Trainer in a Ray world with an MLflow reporter. Returns
    rank 0's summary (the driver reads result.return_value)."""
    entered = time.time()
    if ctx.get("code"):
        unpack_code(ctx["code"])  # the user's model package, importable before the model is built
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
