"""Pure-torch training: `TrainState` (the one checkpoint schema), `Trainer(config, world, reporter).run()`
(the one driver), worlds and reporters. No ray, no mlflow (tests/unit/test_imports.py)."""

from pipeline.training.guard import CollapseGuard
from pipeline.training.inprocess import fit_in_process
from pipeline.training.plan import EpochPlan, plan_epoch
from pipeline.training.state import SCHEMA_VERSION, BestEpoch, TrainState, WeightAverage
from pipeline.training.trainer import Trainer
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
    "fit_in_process",
    "plan_epoch",
]
