"""`Trainer(config, world, reporter).run()`: the one training driver.

Every rank runs it: reads its shard, attacks it on its own unwrapped replica, trains (DDP averages the
gradients when the world is distributed), validates on its share of the validation split, and commits
every epoch (rank 0 checkpoints the whole `TrainState`, every rank reports). A resumed run starts after
the last committed checkpoint, and the reporter gets exactly one record per epoch across resumes. Ray
Train gives it a Ray world and an MLflow reporter; tests and benchmarks a local world and an in-memory
reporter. Pure torch: no ray, no mlflow.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline import data as data_lib
from pipeline.config import Config, to_toml
from pipeline.methods import method_spec
from pipeline.methods import replays as method_replays
from pipeline.models import build_model, head_parameter_names, load_pretrained
from pipeline.training import steps
from pipeline.training.guard import collapsed, fallback_training
from pipeline.training.plan import EpochPlan, plan_epoch
from pipeline.training.state import TrainState, WeightAverage
from pipeline.training.validation import clean_and_robust_correct, predict
from pipeline.training.world import Reporter, World

log = logging.getLogger(__name__)

PROBE_EXAMPLES = 128


def device_label(device: torch.device) -> str:
    """Where a rank trains, for the run's records: "cpu", or "cuda:0 (NVIDIA H100 80GB HBM3, 9.0)"."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, {major}.{minor})"


class Trainer:
    def __init__(
        self,
        config: Config,
        world: World,
        reporter: Reporter,
        *,
        architecture: dict[str, Any],
        loader: str = "memory",
        objective_clean_weight: float = 0.0,
        to_worker_s: float | None = None,
        entered_unix: float | None = None,
        on_step: Callable[[int, int, float, nn.Module], bool] | None = None,
    ) -> None:
        """`on_step(epoch, step, seconds, network)` runs after every minibatch with its training time and
        the unwrapped network; returning True ends the run after that epoch is validated and committed
        (benchmarks that evaluate mid-epoch and stop at a target)."""
        self.entered = entered_unix or time.time()  # when this rank started: the base of time/worker_setup_s
        self.config, self.world, self.reporter, self.arch = config, world, reporter, architecture
        self.loader, self.objective_clean_weight, self.to_worker_s = loader, objective_clean_weight, to_worker_s
        self.on_step, self.stop_requested = on_step, False
        self.guarded = config.method.co_guard and method_spec(config.method.name).adversarial

    # ----------------------------------------------------------------------------- setup

    def _load_data(self) -> None:
        config, world = self.config, self.world
        if self.loader == "memory":
            # uint8 on the GPU when it fits (pinned host memory otherwise), made float per batch.
            x_train, y_train = data_lib.load_split(config.data.path, "train", as_uint8=True)
            self.x_train, self.y_train = steps.place_split(x_train, y_train, world.device)
            self.num_train = len(self.y_train)
        else:
            self.num_train = data_lib.read_metadata(config.data.path).num_rows("train")
        x_val, y_val = data_lib.load_split(config.data.path, "val", max_examples=config.validation.num_examples)
        self.x_probe, self.y_probe = x_val[:PROBE_EXAMPLES], y_val[:PROBE_EXAMPLES]
        self.x_val, self.y_val = x_val[world.rank :: world.world_size], y_val[world.rank :: world.world_size]

    def _build_state(self) -> TrainState:
        config, world = self.config, self.world
        torch.manual_seed(config.run.seed)  # same initial weights on every rank (DDP also broadcasts)
        model = build_model(self.arch)
        if config.model.init:  # a local .safetensors file: the driver resolves models:/ and runs:/ URIs
            load_pretrained(model, config.model.init, arch=self.arch)
        if config.scaling.sync_batchnorm and world.world_size > 1:
            # Same parameters and buffers, so checkpoints and the registered weights are a BatchNorm's.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if world.device.type == "cuda":
            # Fixed input shapes: cuDNN benchmarks each conv's algorithms once and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        self.model = world.prepare_model(model)
        network = self.model.module if hasattr(self.model, "module") else self.model  # unwrapped: no DDP hooks
        # The weight average: a copy on every rank, identical across ranks because DDP keeps the trained
        # weights identical, so the sharded validation needs no broadcast. Validation, keep_best and
        # registration see it; the collapse probe watches the trained weights (the average would hide a
        # collapse for a while, and the restore is of the trained weights).
        decay = config.run.weight_average_decay
        average = WeightAverage(network, decay=decay) if decay > 0 else None
        optimizer = steps.make_optimizer(self.model, config.optim, head=head_parameter_names(self.arch))
        self.steps_per_epoch = -(-(self.num_train // world.world_size) // config.data.batch_size)
        self.replays = method_replays(config.method.name, config.method.replays)
        scheduler = steps.make_scheduler(
            optimizer, config.optim, total_epochs=config.run.epochs, steps_per_epoch=self.steps_per_epoch * self.replays
        )
        return TrainState(network, optimizer, scheduler, average=average)

    def _start(self, state: TrainState) -> None:
        """Resume from the last checkpoint, resolve the precision, and (rank 0) record where ranks run and
        re-log epochs whose checkpoint committed but whose metrics never reached the reporter."""
        config, world = self.config, self.world
        checkpoint = world.load_checkpoint()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            state.load_state_dict(checkpoint)
            if world.rank == 0:
                log.info("resuming from the checkpoint of epoch %d", state.epoch)
        # run.mixed_precision as this rank runs it: "auto" depends on this rank's device, which need not be
        # the driver's (a CPU head node, GPU workers).
        bf16_native = steps.bf16_is_native(world.device)
        self.precision = steps.training_precision(config.run.mixed_precision, bf16_native=bf16_native)
        placement = world.all_gather_object((world.node_id(), self.precision, device_label(world.device)))
        if world.rank != 0:
            return
        precisions = sorted({p for _, p, _ in placement})
        self.reporter.start(
            node_ids=[node for node, _, _ in placement],
            precisions=precisions,
            devices=[device for _, _, device in placement],
            resumed_from=state.epoch if self.resumed else None,
        )
        log.info("training precision: %s (run.mixed_precision = %s)", ",".join(precisions), config.run.mixed_precision)
        if config.run.mixed_precision == "bf16" and not bf16_native:
            log.warning(
                "run.mixed_precision = 'bf16' on %s, which has no bf16 hardware: emulated bf16 trained ~15x "
                "slower than fp32 on an AVX2-only CPU (benchmarks/mixed_precision.py); set run.mixed_precision = "
                "'auto' or 'none'",
                world.device,
            )
        self.logged = self.reporter.logged_epochs()
        for row in state.history:
            if row["epoch"] not in self.logged:
                self.reporter.log_epoch(row["metrics"], epoch=row["epoch"])
                self.logged.add(row["epoch"])

    # ----------------------------------------------------------------------------- one epoch

    def _plan(self, state: TrainState, epoch: int) -> EpochPlan:
        return plan_epoch(self.config, epoch, steps_per_epoch=self.steps_per_epoch, fallback=state.guard.fallback)

    def _batches(self, epoch: int):
        config, world = self.config, self.world
        if self.loader == "memory":
            indices = data_lib.shard_indices(
                self.num_train, rank=world.rank, world_size=world.world_size, epoch=epoch, seed=config.run.seed
            )
            return steps.tensor_batches(self.x_train, self.y_train, indices, config.data.batch_size)
        batches = world.streamed_batches(config.data.batch_size)
        assert batches is not None, f"data.loader '{self.loader}' needs a world that streams batches"
        return batches

    def _train_and_validate(self, state: TrainState, epoch: int, plan: EpochPlan) -> dict[str, float]:
        """Train one epoch, validate, and return the all-reduced sums and timings."""
        config, world, attack = self.config, self.world, self.config.attack
        # Per-epoch, per-rank seeds: a resumed epoch sees the same data order and random starts.
        seed = config.run.seed * 1_000_003 + epoch * 1009 + world.rank
        generator = torch.Generator(device=world.device).manual_seed(seed)
        torch.manual_seed(seed)
        train = steps.train_epoch(
            self.model,
            state.model,
            self._batches(epoch),
            plan,
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            device=world.device,
            generator=generator,
            precision=self.precision,
            on_step=None
            if self.on_step is None
            else lambda step, seconds: self._step_hook(state, epoch, step, seconds),
            after_optimizer_step=None if state.average is None else lambda: state.average.update(state.model),
        )
        val_started = time.perf_counter()
        val = self._robust_counts(state.shipped_model, self.x_val, self.y_val, generator)
        probe = {"robust_correct": 0.0, "count": 0.0}
        if world.rank == 0:
            # Catastrophic-overfitting probe (Wong et al. 2020): PGD-10 accuracy on a fixed validation
            # batch with a fixed seed; a sudden collapse here while train accuracy climbs is the sign.
            probe = clean_and_robust_correct(
                state.model,
                self.x_probe,
                self.y_probe,
                eps=attack.eps,
                norm=attack.norm,
                num_steps=10,
                step_size_factor=2.5,
                num_restarts=1,
                batch_size=config.validation.batch_size,
                device=world.device,
                generator=torch.Generator(device=world.device).manual_seed(config.run.seed),
            )
        val_seconds = time.perf_counter() - val_started
        # The probe is rank 0's alone; summing it in hands every rank the same value, so all ranks take
        # the same catastrophic-overfitting decision.
        keys = ["loss_sum", "correct", "count", "val_clean", "val_robust", "val_count", "probe_robust", "probe_count"]
        values = [train["loss_sum"], train["correct"], train["count"], val["clean_correct"], val["robust_correct"]]
        values += [val["count"], probe["robust_correct"], probe["count"]]
        sums = dict(zip(keys, world.all_reduce_sum(values), strict=True))
        return {**sums, "eps": train["eps"], "lr": train["lr"], "train_s": train["seconds"], "val_s": val_seconds}

    def _step_hook(self, state: TrainState, epoch: int, step: int, seconds: float) -> bool:
        self.stop_requested = bool(self.on_step(epoch, step, seconds, state.model))
        return self.stop_requested

    def _robust_counts(self, model: nn.Module, x, y, generator) -> dict[str, float]:
        config = self.config
        return clean_and_robust_correct(
            model,
            x,
            y,
            eps=config.attack.eps,
            norm=config.attack.norm,
            num_steps=config.validation.num_steps,
            step_size_factor=config.validation.step_size_factor,
            num_restarts=config.validation.num_restarts,
            batch_size=config.validation.batch_size,
            device=self.world.device,
            generator=generator,
        )

    def _metrics(self, epoch: int, sums: dict[str, float], plan: EpochPlan) -> dict[str, float]:
        count, val_count = max(sums["count"], 1), max(sums["val_count"], 1)
        metrics = {
            "train/loss": sums["loss_sum"] / count,
            "train/acc": sums["correct"] / count,
            "train/eps": sums["eps"],
            "train/lr": sums["lr"],
            "train/images_per_s": sums["count"] / max(sums["train_s"], 1e-9),
            "train/fallback": float(plan.fallback),
            "val/clean_acc": sums["val_clean"] / val_count,
            "val/robust_acc": sums["val_robust"] / val_count,
            "val/probe_pgd_acc": sums["probe_robust"] / max(sums["probe_count"], 1),
            "objective": sums["val_robust"] / val_count + self.objective_clean_weight * sums["val_clean"] / val_count,
            "time/train_s": sums["train_s"],
            "time/val_s": sums["val_s"],
            "time/epoch_s": sums["train_s"] + sums["val_s"],
            # This rank's peak resident memory so far (Linux reports KiB): what a streamed dataset must bound.
            "sys/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if epoch == 1 and not self.resumed:
            # Start-up cost, logged with the first epoch of a fresh run: driver start -> this rank (when the
            # world knows it), then this rank -> the first step (data, model, DDP wrapping, records).
            metrics["time/worker_setup_s"] = self.first_step_unix - self.entered
            if self.to_worker_s is not None:
                metrics["time/to_worker_s"] = self.to_worker_s
        return metrics

    def _collapsed(self, state: TrainState, epoch: int, metrics: dict[str, float], last_good: dict) -> bool:
        """The collapse guard: on a collapse, go back to the last good epoch and switch to the fallback
        for the rest of the run (every rank decides alike: the probe value is all-reduced)."""
        if not self.guarded or state.guard.fallback:
            return False
        probe_acc = metrics["val/probe_pgd_acc"]
        best_probe = max((row["metrics"].get("val/probe_pgd_acc", 0.0) for row in state.history), default=0.0)
        if not collapsed(probe_acc, best_probe, drop=self.config.method.co_drop):
            return False
        method = self.config.method
        fallback_method, fallback_attack = fallback_training(
            method.name, self.config.attack, min_steps=method.co_fallback_steps
        )
        event = {
            "epoch": epoch,
            "probe_pgd_acc": probe_acc,
            "best_probe_pgd_acc": best_probe,
            "restored_epoch": epoch - 1,
            "fallback": f"{fallback_method} with PGD-{fallback_attack.num_steps}",
        }
        state.guard.fire(event)
        state.restore(last_good)
        if self.world.rank == 0:
            log.warning(
                "epoch %d: catastrophic overfitting (probe PGD accuracy %.3f, best %.3f); restored epoch %d "
                "and continuing with %s",
                epoch,
                probe_acc,
                best_probe,
                epoch - 1,
                event["fallback"],
            )
            self.reporter.event(
                "advtrain.catastrophic_overfitting",
                state.guard.events,
                epoch=epoch,
                metrics={"co/collapsed_probe_pgd_acc": probe_acc},
            )
        return True

    def _commit(self, state: TrainState, epoch: int, metrics: dict[str, float]) -> None:
        """Checkpoint (rank 0) and report (every rank, equally often, or Ray Train hangs); then log, after
        the checkpoint committed, so a logged epoch always has a checkpoint behind it."""
        if self.world.rank != 0:
            self.world.commit({**metrics, "epoch": epoch}, None)
            return
        checkpoint = {
            **state.state_dict(),
            "architecture_json": json.dumps(self.arch),
            "config_toml": to_toml(self.config),
        }
        self.world.commit({**metrics, "epoch": epoch}, checkpoint)
        if epoch not in self.logged:  # one value per epoch across resumes
            self.reporter.log_epoch(metrics, epoch=epoch)
            self.logged.add(epoch)
        log.info(
            "epoch %3d/%d  loss %.4f  train_acc %.3f  eps %.3f  val_clean %.3f  val_robust %.3f  probe %.3f  "
            "%.0f img/s  %.1fs",
            epoch,
            self.config.run.epochs,
            metrics["train/loss"],
            metrics["train/acc"],
            metrics["train/eps"],
            metrics["val/clean_acc"],
            metrics["val/robust_acc"],
            metrics["val/probe_pgd_acc"],
            metrics["train/images_per_s"],
            metrics["time/epoch_s"],
        )

    # ----------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any] | None:
        """Train every remaining epoch; returns rank 0's summary (None on other ranks)."""
        self._load_data()
        state = self._build_state()
        self.logged: set[int] = set()
        self._start(state)
        last_good = state.snapshot(full=self.guarded)
        self.first_step_unix = time.time()
        epoch = state.epoch + 1
        while epoch <= self.config.run.epochs:
            plan = self._plan(state, epoch)
            metrics = self._metrics(epoch, self._train_and_validate(state, epoch, plan), plan)
            if self._collapsed(state, epoch, metrics, last_good):
                continue  # the collapsed epoch is redone, never checkpointed, logged as an epoch or shipped
            state.history.append({"epoch": epoch, "metrics": metrics})
            state.epoch = epoch
            last_good = state.snapshot(full=self.guarded)
            state.best.offer(epoch, metrics["val/robust_acc"], state.shipped_weights(last_good))
            self._commit(state, epoch, metrics)
            if self.stop_requested:
                break
            epoch += 1
        keep_best = self.config.run.keep_best and state.best.weights is not None
        if keep_best:
            state.model.load_state_dict(state.best.weights)
        elif state.average is not None:
            state.model.load_state_dict(state.average.model.state_dict())
        if self.world.rank != 0:
            return None
        registered_epoch = state.best.epoch if keep_best else state.history[-1]["epoch"]
        return self._finish(state, registered_epoch=registered_epoch)

    def _finish(self, state: TrainState, *, registered_epoch: int) -> dict[str, Any]:
        """Rank 0: test-set numbers of the chosen epoch's weights, then hand them to the reporter."""
        config, device, model = self.config, self.world.device, state.model
        chosen = next(row["metrics"] for row in state.history if row["epoch"] == registered_epoch)
        generator = torch.Generator(device=device).manual_seed(config.run.seed)
        left = config.validation.num_examples or None  # robust accuracy on the first N test examples (0: all)
        robust = count = correct = total = 0
        # File by file: a streamed dataset's test split need not fit in memory either.
        for x_test, y_test in data_lib.split_files(config.data.path, "test"):
            take = len(y_test) if left is None else min(left, len(y_test))
            if take:
                part = self._robust_counts(model, x_test[:take], y_test[:take], generator)
                robust, count = robust + part["robust_correct"], count + part["count"]
                left = None if left is None else left - take
            model.eval()
            # Clean accuracy on the whole test split with the same function a loaded model is checked with.
            predictions = predict(model, x_test, batch_size=config.validation.batch_size, device=device)
            correct, total = correct + int((predictions == y_test).sum()), total + len(y_test)
        # float32 like the per-split mean a loaded model is checked with (tests compare them exactly).
        clean = float(torch.tensor(float(correct), device="cpu") / max(total, 1))
        test_metrics = {"test/clean_acc": clean, "test/robust_acc": robust / max(count, 1)}
        cpu_model = build_model(self.arch)
        cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        registered = self.reporter.finish(
            cpu_model, registered_epoch=registered_epoch, chosen=chosen, test=test_metrics
        )
        return {
            "registered_epoch": registered_epoch,
            "val/clean_acc": chosen["val/clean_acc"],
            "val/robust_acc": chosen["val/robust_acc"],
            **test_metrics,
            "model_version": registered["model_version"],
            "weights_sha256": registered["weights_sha256"],
        }
