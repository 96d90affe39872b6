"""Ray Train glue: the driver (`run_training`) and the per-worker loop (`train_worker_loop`).

Driver: resolves every path and the tracking URI to absolute ones (Ray workers chdir elsewhere),
validates the data once, names the run, creates/reopens its MLflow run and fits a TorchTrainer.
Workers: read their shard, attack it on their own unwrapped replica, train under DDP, validate, and
checkpoint every epoch (rank 0 writes, every rank reports). Resuming — after Ray restarts the worker
group (FailureConfig) or when a run with the same name is submitted again — starts after the last
committed checkpoint, and MLflow keeps exactly one value per epoch.
"""

from __future__ import annotations

import copy
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
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import data as data_lib
from pipeline import loop, tracking
from pipeline.config import Config, ConfigError, flat_params, to_toml
from pipeline.methods import get_method, method_spec
from pipeline.methods import replays as method_replays
from pipeline.models import architecture, build_model

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
FINISHED_MARKER = "advtrain_finished.json"
SENTINEL_METRIC = "train/loss"
PROBE_EXAMPLES = 128
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


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)


def _cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _snapshot(
    model: torch.nn.Module, optimizer, scheduler, *, full: bool, averaging: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An in-memory copy of the weights and of their average, if any (CPU tensors; the best epoch's
    candidate) and, when `full` (the catastrophic-overfitting guard may go back to it), of the
    optimizer and LR-schedule state."""
    snapshot: dict[str, Any] = {"model": _cpu_weights(model)}
    if averaging:
        snapshot["average"] = _cpu_weights(averaging["model"])
        snapshot["average_updates"] = averaging["updates"]
    if full:
        snapshot["optimizer"] = copy.deepcopy(optimizer.state_dict())
        snapshot["scheduler"] = copy.deepcopy(scheduler.state_dict())
    return snapshot


def _restore(
    snapshot: dict[str, Any], model: torch.nn.Module, optimizer, scheduler, *, averaging: dict[str, Any] | None = None
) -> None:
    model.load_state_dict(snapshot["model"])
    if averaging:
        averaging["model"].load_state_dict(snapshot["average"])
        averaging["updates"] = snapshot["average_updates"]
    optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(snapshot["scheduler"]))


def _load_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        # weights_only=True: a checkpoint is data, never code.
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _ray_data_batches(batch_size: int, shape, num_classes: int):
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * batch_size
    ):
        yield data_lib.decode_batch(batch["image"], batch["label"], shape, num_classes)


def _quiet_report_logging() -> None:
    """Ray Train logs every report at INFO ("Reporting training result ...") from a logger named after
    its module's file; the per-epoch line of rank 0 says the same, readably."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray version with another layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_worker_loop(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker. Returns rank 0's summary (the driver reads result.return_value)."""
    entered = time.time()
    config = Config.model_validate(ctx["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    _quiet_report_logging()
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch's intra-op pool match explicitly.
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    arch = ctx["architecture"]
    shape, num_classes = tuple(arch["shape"]), arch["num_classes"]
    data_path = config.data.path

    if ctx["loader"] == "memory":
        x_train, y_train = data_lib.load_split(data_path, "train")
        num_train = len(y_train)
    else:
        num_train = data_lib.read_metadata(data_path).num_rows("train")
    x_val, y_val = data_lib.load_split(data_path, "val", max_examples=config.validation.num_examples)
    x_probe, y_probe = x_val[:PROBE_EXAMPLES], y_val[:PROBE_EXAMPLES]
    x_val, y_val = x_val[rank::world_size], y_val[rank::world_size]

    torch.manual_seed(config.run.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = ray.train.torch.prepare_model(build_model(arch))
    attack_model = model.module if hasattr(model, "module") else model  # unwrapped: no DDP hooks
    # The weight average (run.weight_average_decay): a copy on every rank, identical across ranks because
    # DDP keeps the trained weights identical, so the sharded validation needs no broadcast. Validation,
    # keep_best and registration see it; the collapse probe watches the trained weights (the average
    # would hide a collapse for a while, and the restore is of the trained weights).
    averaging = loop.new_weight_average(attack_model, decay=config.run.weight_average_decay)
    shipped_model = averaging["model"] if averaging else attack_model
    update_average = loop.weight_average_hook(averaging, attack_model)

    optimizer = loop.make_optimizer(model, config.optim)
    steps_per_epoch = -(-(num_train // world_size) // config.data.batch_size)
    replays = method_replays(config.method.name, config.method.replays)
    scheduler = loop.make_scheduler(
        optimizer, config.optim, total_epochs=config.run.epochs, steps_per_epoch=steps_per_epoch * replays
    )

    uri, run_id = ctx["tracking_uri"], ctx["run_id"]
    start_epoch, history = 1, []
    # Catastrophic-overfitting state: once it fired, training goes on with the fallback attack.
    guard: dict[str, Any] = {"fallback": False, "events": []}
    best: dict[str, Any] = {"epoch": 0, "val_robust": -1.0, "model": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint)
        attack_model.load_state_dict(state["model"])
        if averaging:
            saved_average = state.get("average_model")
            averaging["model"].load_state_dict(saved_average if saved_average is not None else state["model"])
            averaging["updates"] = int(state.get("average_updates", 0))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        guard = {"fallback": bool(state.get("co_fallback", False)), "events": list(state.get("co_events", []))}
        if state.get("best_model") is not None:
            best = {"epoch": state["best_epoch"], "val_robust": state["best_val_robust"], "model": state["best_model"]}
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", start_epoch - 1)
    # Where the ranks run (node ids, one per rank), recorded on the run: multi-node placement is visible
    # in MLflow, and changes after a node loss show in the tag of the latest worker group.
    # run.mixed_precision as this rank runs it: "auto" depends on this worker's device, which need not be
    # the driver's (a CPU head node, GPU workers). The tag records every rank's, once per worker group.
    bf16_native = loop.bf16_is_native(device)
    precision = loop.training_precision(config.run.mixed_precision, bf16_native=bf16_native)
    placement = [(ray.get_runtime_context().get_node_id(), precision)]
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, placement[0])
        placement = gathered
    node_ids = [node for node, _ in placement]
    precisions = sorted({p for _, p in placement})
    already_logged = tracking.logged_epochs(uri, run_id, SENTINEL_METRIC) if rank == 0 else set()
    if rank == 0:
        tracking.set_tags(
            uri,
            run_id,
            {"advtrain.worker_nodes": json.dumps(node_ids), "advtrain.mixed_precision": ",".join(precisions)},
        )
        log.info("training precision: %s (run.mixed_precision = %s)", ",".join(precisions), config.run.mixed_precision)
        if config.run.mixed_precision == "bf16" and not bf16_native:
            log.warning(
                "run.mixed_precision = 'bf16' on %s, which has no bf16 hardware: emulated bf16 trained ~15x "
                "slower than fp32 on an AVX2-only CPU (benchmarks/mixed_precision.py); set run.mixed_precision = "
                "'auto' or 'none'",
                device,
            )
        if checkpoint is not None:
            # Every restart (a replaced worker group or a resubmission) is on the run: when, from which
            # epoch, on which nodes. Operators read recovery times from it; tests assert the epoch.
            restarts = json.loads(tracking.run_tags(uri, run_id).get(RESTARTS_TAG, "[]"))
            restarts.append({"from_epoch": start_epoch - 1, "unix_time": time.time(), "worker_nodes": node_ids})
            tracking.record_event(uri, run_id, RESTARTS_TAG, restarts, epoch=start_epoch - 1, metrics={})
        # Epochs whose checkpoint committed but whose metrics never reached MLflow (killed in between).
        for row in history:
            if row["epoch"] not in already_logged:
                tracking.log_epoch(uri, run_id, row["metrics"], epoch=row["epoch"])
                already_logged.add(row["epoch"])
    guarded = config.method.co_guard and method_spec(config.method.name).adversarial
    last_good = _snapshot(attack_model, optimizer, scheduler, full=guarded, averaging=averaging)
    # What the run trains with once a collapse is caught (named in the event, used every later epoch).
    fallback_method, fallback_attack = loop.fallback_training(
        config.method.name, config.attack, min_steps=config.method.co_fallback_steps
    )

    attack = config.attack
    epoch = start_epoch
    # Start-up cost, logged with the first epoch of a fresh run: driver start -> this function (MLflow
    # run, Train controller, placement group, worker processes, imports, process group), then this
    # function -> the first step (data, model, DDP wrapping, MLflow tags).
    startup = (
        {"time/to_worker_s": entered - ctx["driver_started_unix"], "time/worker_setup_s": time.time() - entered}
        if checkpoint is None
        else {}
    )
    while epoch <= config.run.epochs:
        # Per-epoch, per-rank seeds: a resumed epoch sees the same data order and random starts.
        generator = torch.Generator(device=device).manual_seed(config.run.seed * 1_000_003 + epoch * 1009 + rank)
        torch.manual_seed(config.run.seed * 1_000_003 + epoch * 1009 + rank)
        if ctx["loader"] == "memory":
            indices = data_lib.shard_indices(
                num_train, rank=rank, world_size=world_size, epoch=epoch, seed=config.run.seed
            )
            batches = loop.tensor_batches(x_train, y_train, indices, config.data.batch_size)
        else:
            batches = _ray_data_batches(config.data.batch_size, shape, num_classes)

        eps_for_step, epoch_attack = loop.epoch_schedule(config, epoch, steps_per_epoch=steps_per_epoch)
        method_name = config.method.name
        if guard["fallback"]:
            method_name, epoch_attack = fallback_method, fallback_attack
        # A fresh method per epoch: free_at's persistent perturbation restarts at zero each epoch, so a
        # resumed or restored epoch trains exactly as it first did.
        method = get_method(method_name, config.method)

        train = loop.train_epoch(
            model,
            attack_model,
            batches,
            optimizer=optimizer,
            scheduler=scheduler,
            method=method,
            attack=epoch_attack,
            eps_for_step=eps_for_step,
            attack_mode=config.method.attack_mode,
            device=device,
            generator=generator,
            replays=replays,
            mixed_precision=precision,
            augment=config.data.augment,
            awp_gamma=loop.weight_perturbation_gamma(config.method, epoch),
            after_optimizer_step=update_average,
        )
        val_started = time.perf_counter()
        val = loop.clean_and_robust_correct(
            shipped_model,
            x_val,
            y_val,
            eps=attack.eps,
            norm=attack.norm,
            num_steps=config.validation.num_steps,
            step_size_factor=config.validation.step_size_factor,
            num_restarts=config.validation.num_restarts,
            batch_size=config.validation.batch_size,
            device=device,
            generator=generator,
        )
        probe = {"robust_correct": 0.0, "count": 0.0}
        if rank == 0:
            # Catastrophic-overfitting probe (Wong et al. 2020): PGD-10 accuracy on a fixed validation
            # batch with a fixed seed; a sudden collapse here while train accuracy climbs is the sign.
            probe = loop.clean_and_robust_correct(
                attack_model,
                x_probe,
                y_probe,
                eps=attack.eps,
                norm=attack.norm,
                num_steps=10,
                step_size_factor=2.5,
                num_restarts=1,
                batch_size=config.validation.batch_size,
                device=device,
                generator=torch.Generator(device=device).manual_seed(config.run.seed),
            )
        val_seconds = time.perf_counter() - val_started
        # The probe is rank 0's alone; summing it in hands every rank the same value, so all ranks take
        # the same catastrophic-overfitting decision.
        loss_sum, correct, count, val_clean, val_robust, val_count, probe_robust, probe_count = _all_reduce_sums(
            [
                train["loss_sum"],
                train["correct"],
                train["count"],
                val["clean_correct"],
                val["robust_correct"],
                val["count"],
                probe["robust_correct"],
                probe["count"],
            ],
            device,
        )
        probe_acc = probe_robust / max(probe_count, 1)
        best_probe = max((row["metrics"].get("val/probe_pgd_acc", 0.0) for row in history), default=0.0)
        if guarded and not guard["fallback"] and loop.collapsed(probe_acc, best_probe, drop=config.method.co_drop):
            event = {
                "epoch": epoch,
                "probe_pgd_acc": probe_acc,
                "best_probe_pgd_acc": best_probe,
                "restored_epoch": epoch - 1,
                "fallback": f"{fallback_method} with PGD-{fallback_attack.num_steps}",
            }
            guard = {"fallback": True, "events": [*guard["events"], event]}
            _restore(last_good, attack_model, optimizer, scheduler, averaging=averaging)
            if rank == 0:
                log.warning(
                    "epoch %d: catastrophic overfitting (probe PGD accuracy %.3f, best %.3f); restored epoch %d "
                    "and continuing with %s",
                    epoch,
                    probe_acc,
                    best_probe,
                    epoch - 1,
                    event["fallback"],
                )
                tracking.record_event(
                    uri,
                    run_id,
                    "advtrain.catastrophic_overfitting",
                    guard["events"],
                    epoch=epoch,
                    metrics={"co/collapsed_probe_pgd_acc": probe_acc},
                )
            continue  # the collapsed epoch is redone, never checkpointed, logged as an epoch or shipped

        metrics = {
            "train/loss": loss_sum / max(count, 1),
            "train/acc": correct / max(count, 1),
            "train/eps": train["eps"],
            "train/lr": train["lr"],
            "train/images_per_s": count / max(train["seconds"], 1e-9),
            "train/fallback": float(guard["fallback"]),
            "val/clean_acc": val_clean / max(val_count, 1),
            "val/robust_acc": val_robust / max(val_count, 1),
            "val/probe_pgd_acc": probe_acc,
            "objective": val_robust / max(val_count, 1)
            + ctx.get("objective_clean_weight", 0.0) * val_clean / max(val_count, 1),
            "time/train_s": train["seconds"],
            "time/val_s": val_seconds,
            "time/epoch_s": train["seconds"] + val_seconds,
            **(startup if epoch == 1 else {}),
        }
        history.append({"epoch": epoch, "metrics": metrics})
        last_good = _snapshot(attack_model, optimizer, scheduler, full=guarded, averaging=averaging)
        if metrics["val/robust_acc"] > best["val_robust"]:
            shipped_weights = last_good["average"] if averaging else last_good["model"]
            best = {"epoch": epoch, "val_robust": metrics["val/robust_acc"], "model": shipped_weights}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(
                    Path(tmp),
                    {
                        "model": attack_model.state_dict(),
                        "average_model": averaging["model"].state_dict() if averaging else None,
                        "average_updates": averaging["updates"] if averaging else 0,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "co_fallback": guard["fallback"],
                        "co_events": guard["events"],
                        "best_epoch": best["epoch"],
                        "best_val_robust": best["val_robust"],
                        "best_model": best["model"],
                        "rng_state": torch.get_rng_state(),
                        "architecture_json": json.dumps(arch),
                        "config_toml": to_toml(config),
                        "mlflow_run_id": run_id,
                    },
                )
                ray.train.report({**metrics, "epoch": epoch}, checkpoint=Checkpoint.from_directory(tmp))
            # After the checkpoint commits, so a logged epoch always has a checkpoint behind it;
            # skipping logged epochs keeps exactly one value per epoch across resumes.
            if epoch not in already_logged:
                tracking.log_epoch(uri, run_id, metrics, epoch=epoch)
                already_logged.add(epoch)
            log.info(
                "epoch %3d/%d  loss %.4f  train_acc %.3f  eps %.3f  val_clean %.3f  val_robust %.3f  probe %.3f  "
                "%.0f img/s  %.1fs",
                epoch,
                config.run.epochs,
                metrics["train/loss"],
                metrics["train/acc"],
                metrics["train/eps"],
                metrics["val/clean_acc"],
                metrics["val/robust_acc"],
                metrics["val/probe_pgd_acc"],
                metrics["train/images_per_s"],
                metrics["time/epoch_s"],
            )
        else:
            ray.train.report({**metrics, "epoch": epoch})  # every rank reports equally often, or training hangs
        epoch += 1

    if config.run.keep_best and best["model"] is not None:
        attack_model.load_state_dict(best["model"])
    elif averaging:
        attack_model.load_state_dict(averaging["model"].state_dict())
    if rank != 0:
        return None
    registered_epoch = best["epoch"] if config.run.keep_best and best["model"] is not None else history[-1]["epoch"]
    return _finish(config, ctx, attack_model, history, device, registered_epoch=registered_epoch)


def _finish(
    config: Config,
    ctx: dict[str, Any],
    model: torch.nn.Module,
    history: list[dict],
    device: torch.device,
    *,
    registered_epoch: int,
) -> dict[str, Any]:
    """Rank 0: test-set numbers of the chosen epoch's weights, then log and register them (no pickle)."""
    uri, run_id, arch = ctx["tracking_uri"], ctx["run_id"], ctx["architecture"]
    chosen = next(row["metrics"] for row in history if row["epoch"] == registered_epoch)
    x_test, y_test = data_lib.load_split(config.data.path, "test")
    generator = torch.Generator(device=device).manual_seed(config.run.seed)
    n_robust = config.validation.num_examples or len(y_test)
    test = loop.clean_and_robust_correct(
        model,
        x_test[:n_robust],
        y_test[:n_robust],
        eps=config.attack.eps,
        norm=config.attack.norm,
        num_steps=config.validation.num_steps,
        step_size_factor=config.validation.step_size_factor,
        num_restarts=config.validation.num_restarts,
        batch_size=config.validation.batch_size,
        device=device,
        generator=generator,
    )
    model.eval()
    # Clean accuracy on the whole test split with the same function a loaded model is checked with.
    predictions = loop.predict(model, x_test, batch_size=config.validation.batch_size, device=device)
    test_clean = float((predictions == y_test).float().mean())
    test_metrics = {"test/clean_acc": test_clean, "test/robust_acc": test["robust_correct"] / max(test["count"], 1)}
    tracking.log_epoch(
        uri,
        run_id,
        {
            **test_metrics,
            "registered/epoch": float(registered_epoch),
            "registered/val_robust_acc": chosen["val/robust_acc"],
        },
        epoch=config.run.epochs,
    )
    cpu_model = build_model(arch)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    registered = tracking.log_and_register_model(
        uri,
        run_id,
        model=cpu_model,
        arch=arch,
        registered_model=config.tracking.registered_model,
        alias=config.tracking.alias,
        version_tags={
            "dataset": ctx["dataset_source"],
            "threat_model.norm": config.attack.norm,
            "threat_model.eps": config.attack.eps,
            "method": config.method.name,
            "test_clean_acc": test_clean,
            "epoch": registered_epoch,
            "val_robust_acc": chosen["val/robust_acc"],
            "val_robust_protocol": f"pgd-{config.validation.num_steps} x{config.validation.num_restarts} restarts",
        },
    )
    tracking.set_tags(
        uri,
        run_id,
        {"advtrain.weights_sha256": registered["weights_sha256"], "advtrain.registered_epoch": str(registered_epoch)},
    )
    return {
        "registered_epoch": registered_epoch,
        "val/clean_acc": chosen["val/clean_acc"],
        "val/robust_acc": chosen["val/robust_acc"],
        **test_metrics,
        "model_version": registered["version"],
        "weights_sha256": registered["weights_sha256"],
    }


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (address / RAY_ADDRESS) or start a local instance; quiet, fast settings."""
    if ray.is_initialized():
        return
    for key, value in {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
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
            # Tune trial drivers hold this instead of a CPU (pipeline/tune.py): a trial that only waits on
            # its TorchTrainer must not take a CPU its own workers need.
            resources={TRIAL_DRIVER_RESOURCE: 1000},
            include_dashboard=True,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
        )
