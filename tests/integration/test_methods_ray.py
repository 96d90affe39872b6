"""A training method on 2 real Ray Train workers (digits, Linf eps=0.2), tracked on a real MLflow server:
MART with adversarial weight perturbation through DDP beats standard training's PGD robust accuracy and
registers its best-robust epoch with the version tags and params. Every other method against standard
training is tests/inprocess/test_methods_trainer.py, and the collapse guard tests/unit/test_trainer.py: the
same Trainer in-process, where each costs seconds instead of a Ray start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.orchestrate.train import run_training
from pipeline.tracking.runs import client_for, metric_history

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# Per method: the overrides of the digits recipe that make it that method (few epochs: a test, not a recipe).
# pgd_at against standard training is tests/integration/test_train_ray.py (20 epochs, by 30 points).
METHOD_OVERRIDES = {
    # Adversarial weight perturbation on top (Wu et al. 2020), through the Ray workers' DDP step.
    "mart+awp": ["attack.num_steps=5", "method.beta=6.0", "method.awp_gamma=0.01"],
}
EPOCHS = 8


def _config(digits_recipe, tmp_path, *overrides):
    return digits_recipe(
        tmp_path,
        f"run.epochs={EPOCHS}",
        "schedule.eps_ramp_epochs=2",
        "optim.lr=0.003",
        *overrides,
        experiment="methods",
        registered_model="digits-methods",
    )


@pytest.fixture(scope="module")
def standard_run(standard_baseline):
    return standard_baseline  # 8 epochs at this module's LR and ramp (tests/conftest.py)


@pytest.mark.parametrize("case", list(METHOD_OVERRIDES))
def test_method_beats_standard_training_and_registers_its_best_epoch(
    case, standard_run, digits_recipe, mlflow_server, tmp_path
):
    method = case.split("+")[0]
    config = _config(digits_recipe, tmp_path, f'method.name="{method}"', *METHOD_OVERRIDES[case])
    summary = run_training(config, config_name=method)

    assert summary.val_robust_acc >= standard_run.val_robust_acc + 0.15, (method, summary, standard_run)
    assert summary.test_robust_acc >= standard_run.test_robust_acc + 0.15, (method, summary, standard_run)
    assert summary.test_clean_acc > 0.7, summary

    # Robust overfitting (Rice et al.): the registered weights are the epoch with the best val robust accuracy.
    history = metric_history(mlflow_server, summary.mlflow_run_id, "val/robust_acc")
    assert [step for step, _ in history] == list(range(1, EPOCHS + 1)), "one value per epoch"
    best_epoch = max(history, key=lambda item: (item[1], -item[0]))[0]
    assert summary.registered_epoch == best_epoch
    version = client_for(mlflow_server).get_model_version("digits-methods", str(summary.model_version))
    assert version.tags["method"] == method and version.tags["epoch"] == str(best_epoch)
    assert float(version.tags["val_robust_acc"]) == pytest.approx(dict(history)[best_epoch])
    params = client_for(mlflow_server).get_run(summary.mlflow_run_id).data.params
    assert params["method.attack_mode"] == "eval", "the BatchNorm policy of attack generation is logged"
    assert float(params["method.awp_gamma"]) == config.method.awp_gamma
