"""Every training method through the one `Trainer`, in-process (digits, Linf eps=0.2): each beats standard
training's PGD robust accuracy and registers its best-robust epoch. The Ray + MLflow path of the same
driver is tests/integration/test_methods_ray.py (MART with AWP on 2 DDP workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.training import InMemoryReporter, LocalWorld, Trainer
from pipeline.training.inprocess import dataset_architecture

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8
METHOD_OVERRIDES = {
    "fgsm_rs": ['attack.name="fgsm"', "attack.num_steps=1", "attack.step_size_factor=1.25"],
    "free_at": ['attack.name="fgsm"', "attack.num_steps=1", "attack.step_size_factor=1.0", "method.replays=4"],
    "trades": ["attack.num_steps=5", "method.beta=6.0"],
    "mart": ["attack.num_steps=5", "method.beta=6.0"],
}


def _train(digits_path, *overrides):
    config = load_config(
        ROOT / "jobs/configs/digits_demo.toml",
        [
            f'data.path="{digits_path}"',
            f"run.epochs={EPOCHS}",
            "schedule.eps_ramp_epochs=2",
            "optim.lr=0.003",
            *overrides,
        ],
    )
    reporter = InMemoryReporter()
    summary = Trainer(config, LocalWorld(), reporter, architecture=dataset_architecture(config)).run()
    return summary, reporter


@pytest.fixture(scope="module")
def standard(digits_path):
    return _train(digits_path, 'method.name="standard"', "attack.eps=0.2")[0]


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_method_beats_standard_training_and_registers_its_best_epoch(method, standard, digits_path):
    summary, reporter = _train(digits_path, f'method.name="{method}"', *METHOD_OVERRIDES[method])
    assert summary["val/robust_acc"] >= standard["val/robust_acc"] + 0.15, (method, summary, standard)
    assert summary["test/robust_acc"] >= standard["test/robust_acc"] + 0.15, (method, summary, standard)
    assert summary["test/clean_acc"] > 0.7, summary
    # Robust overfitting (Rice et al.): the registered weights are the epoch with the best val robust accuracy.
    robust = {epoch: metrics["val/robust_acc"] for epoch, metrics in reporter.metrics.items()}
    assert sorted(robust) == list(range(1, EPOCHS + 1)), "one value per epoch"
    assert summary["registered_epoch"] == max(robust, key=lambda e: (robust[e], -e))
