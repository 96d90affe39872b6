"""Pure-torch training: `TrainState` (the one checkpoint schema), `Trainer(config, world, reporter).run()`
(the one driver), worlds and reporters. No ray, no mlflow (tests/unit/test_imports.py)."""

from pipeline.training.state import SCHEMA_VERSION, BestEpoch, CollapseGuard, TrainState, WeightAverage
from pipeline.training.trainer import EpochPlan, Trainer
from pipeline.training.world import InMemoryReporter, LocalWorld, Reporter, World

__all__ = [
    "SCHEMA_VERSION",
    "BestEpoch",
    "CollapseGuard",
    "EpochPlan",
    "InMemoryReporter",
    "LocalWorld",
    "Reporter",
    "TrainState",
    "Trainer",
    "WeightAverage",
    "World",
]
