"""`TrainState`: everything a run must carry across a checkpoint, with the one checkpoint schema.

Model, optimizer, LR scheduler, the weight average, the collapse guard, the best epoch so far, the
per-epoch history, the epoch and the RNG states (torch, CUDA when present, numpy, python). A checkpoint
is `state_dict()`; a resumed run calls `load_state_dict()` and continues exactly where it stopped.
Pure torch: no ray, no mlflow.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.training.guard import CollapseGuard

SCHEMA_VERSION = 1


def cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `model`'s state dict (a best-epoch candidate, a snapshot)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class WeightAverage:
    """An exponential moving average of the weights (run.weight_average_decay; Izmailov et al. 2018 use a
    plain average, the EMA is what Rice/Gowal et al. found best for AT). `update()` after each optimizer
    step: average <- d * average + (1 - d) * model with d = min(decay, (1 + n) / (10 + n)) for the n-th
    update, the usual warm-up so the random initial weights are forgotten within tens of steps. Buffers
    (BatchNorm statistics) are copied."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"weight average decay must be in (0, 1), got {decay}")
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = list(self.model.parameters()), list(model.parameters())
        assert len(averaged) == len(current), "the average and the model have the same parameters"
        with torch.no_grad():
            # One fused kernel per list instead of a Python loop of small kernels (a GPU launches each).
            torch._foreach_lerp_(averaged, [p.detach() for p in current], 1.0 - d)
            buffers = list(self.model.buffers())
            if buffers:
                torch._foreach_copy_(buffers, list(model.buffers()))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


@dataclass
class BestEpoch:
    """The epoch with the best validation robust accuracy so far and its shipped weights (CPU)."""

    epoch: int = 0
    val_robust: float = -1.0
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, val_robust: float, weights: dict[str, torch.Tensor]) -> None:
        if val_robust > self.val_robust:
            self.epoch, self.val_robust, self.weights = epoch, val_robust, weights

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_robust": self.val_robust, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.val_robust, self.weights = int(state["epoch"]), float(state["val_robust"]), state["weights"]


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as plain tensors and ints (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """The run's state. `model` is the unwrapped network (what DDP wraps, what attacks run on)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        average: WeightAverage | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.average = model, optimizer, scheduler, average
        self.guard = CollapseGuard()
        self.best = BestEpoch()
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # the last completed epoch

    @property
    def shipped_model(self) -> nn.Module:
        """What validation sees and what is registered: the weight average when there is one."""
        return self.average.model if self.average is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
            "guard": self.guard.state_dict(),
            "best": self.best.state_dict(),
            "history": list(self.history),
            "epoch": self.epoch,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"checkpoint schema version {version!r}; this advtrain reads version {SCHEMA_VERSION}: "
                "start a new run (leave run.name empty) instead of resuming this one"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            # A run checkpointed without an average that resumes with one starts it from the weights.
            self.average.load_state_dict(state["average"] or {"model": state["model"], "updates": 0})
        self.guard.load_state_dict(state["guard"])
        self.best.load_state_dict(state["best"])
        self.history, self.epoch = list(state["history"]), int(state["epoch"])
        set_rng_state(state["rng"])

    def snapshot(self, *, full: bool) -> dict[str, Any]:
        """An in-memory copy of the weights and their average (CPU; the best-epoch candidate) and, when
        `full` (the collapse guard may go back to it), of the optimizer and LR-schedule state."""
        snap: dict[str, Any] = {"model": cpu_weights(self.model)}
        if self.average is not None:
            snap["average"] = {"model": cpu_weights(self.average.model), "updates": self.average.updates}
        if full:
            snap["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
            snap["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        """Back to a `snapshot(full=True)`: weights, average, optimizer and LR schedule."""
        self.model.load_state_dict(snap["model"])
        if self.average is not None:
            self.average.load_state_dict(snap["average"])
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        self.scheduler.load_state_dict(copy.deepcopy(snap["scheduler"]))

    def shipped_weights(self, snap: dict[str, Any]) -> dict[str, torch.Tensor]:
        return snap["average"]["model"] if self.average is not None else snap["model"]
