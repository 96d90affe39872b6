"""A whole run in this process: the one driver (`Trainer`) with a local world and an in-memory reporter.
For tests, benchmarks and quick experiments; a Ray worker runs the same `Trainer` with a Ray world."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data import read_metadata
from pipeline.models import architecture
from pipeline.training.trainer import Trainer
from pipeline.training.world import InMemoryReporter, LocalWorld


def dataset_architecture(config: Config) -> dict[str, Any]:
    """The architecture record of `config.model` for the dataset at `config.data.path`."""
    info = read_metadata(config.data.path)
    return architecture(config.model, shape=info.shape, num_classes=info.num_classes, mean=info.mean, std=info.std)


def fit_in_process(
    config: Config,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float, nn.Module], bool] | None = None,
) -> tuple[nn.Module, dict[str, Any], InMemoryReporter]:
    """Train `config` as rank 0 of a 1-worker run does; returns the shipped model (CPU: the best epoch's
    or the weight average, as a Ray run registers it), its architecture record and the reporter that
    holds every epoch's metrics. `on_step`: see `Trainer`."""
    arch = dataset_architecture(config)
    reporter = InMemoryReporter()
    Trainer(config, LocalWorld(device), reporter, architecture=arch, on_step=on_step).run()
    assert reporter.model is not None, "rank 0's Trainer.run() hands the final model to its reporter"
    return reporter.model, arch, reporter
