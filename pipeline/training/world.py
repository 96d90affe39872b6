"""What the `Trainer` needs from where it runs (`World`) and from where it records (`Reporter`).

Ray Train gives a Ray world and an MLflow reporter (pipeline/orchestrate/worker.py); tests and benchmarks give a
`LocalWorld` (one process, or one rank of an in-process torch.distributed group) and an
`InMemoryReporter`. Pure torch: no ray, no mlflow.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

STATE_FILE = "state.pt"


class World(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The network moved to the device and wrapped for data-parallel training (DDP) when distributed."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (every rank calls it with the same length)."""

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last committed `TrainState.state_dict()`, or None for a fresh run."""

    def commit(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        """End of an epoch: every rank calls it equally often; rank 0 passes the state to checkpoint."""

    def streamed_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """This rank's training batches for one epoch when the data streams (Ray Data), else None."""

    def node_id(self) -> str:
        """Where this rank runs (recorded on the run)."""


class Reporter(Protocol):
    """Rank 0's records. Every method is called on rank 0 only."""

    def logged_epochs(self) -> set[int]: ...

    def start(
        self, *, node_ids: list[str], precisions: list[str], devices: list[str], resumed_from: int | None
    ) -> None: ...

    def log_epoch(self, metrics: dict[str, float], *, epoch: int) -> None: ...

    def event(self, name: str, events: list[dict[str, Any]], *, epoch: int, metrics: dict[str, float]) -> None: ...

    def finish(
        self, model: nn.Module, *, registered_epoch: int, chosen: dict[str, float], test: dict[str, float]
    ) -> dict[str, Any]:
        """Log the test metrics and register `model` (CPU); returns model_version and weights_sha256."""


class LocalWorld:
    """This process: rank and size of the initialised torch.distributed group, else rank 0 of 1.
    Checkpoints go to `checkpoint_dir` (kept in memory when it is None)."""

    def __init__(self, device: torch.device | str = "cpu", checkpoint_dir: str | Path | None = None) -> None:
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.committed: list[dict[str, float]] = []
        self._state: dict[str, Any] | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if not self.distributed:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def load_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint_dir is not None and (self.checkpoint_dir / STATE_FILE).exists():
            # weights_only=True: a checkpoint is data, never code.
            return torch.load(self.checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)
        return self._state

    def commit(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.committed.append(metrics)
        if state is None:
            return
        if self.checkpoint_dir is None:
            # A copy, as a file would be: the state's tensors are the live model's.
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self._state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        else:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.checkpoint_dir / STATE_FILE)

    def streamed_batches(self, batch_size: int) -> None:
        return None

    def node_id(self) -> str:
        return "local"


class InMemoryReporter:
    """Keeps what an MLflow reporter would log: metrics per epoch, events, tags and the final model."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.starts: list[dict[str, Any]] = []
        self.model: nn.Module | None = None
        self.final: dict[str, Any] = {}

    def logged_epochs(self) -> set[int]:
        return set(self.metrics)

    def start(
        self, *, node_ids: list[str], precisions: list[str], devices: list[str], resumed_from: int | None
    ) -> None:
        self.starts.append(
            {"node_ids": node_ids, "precisions": precisions, "devices": devices, "resumed_from": resumed_from}
        )

    def log_epoch(self, metrics: dict[str, float], *, epoch: int) -> None:
        assert epoch not in self.metrics, f"epoch {epoch} logged twice"
        self.metrics[epoch] = dict(metrics)

    def event(self, name: str, events: list[dict[str, Any]], *, epoch: int, metrics: dict[str, float]) -> None:
        self.events[name] = list(events)

    def finish(
        self, model: nn.Module, *, registered_epoch: int, chosen: dict[str, float], test: dict[str, float]
    ) -> dict[str, Any]:
        self.model = model
        self.final = {"registered_epoch": registered_epoch, **test}
        return {"model_version": None, "weights_sha256": ""}
