"""The Ray Data streaming path on the shared local Ray. (Worker and node failures: tests/cluster.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.orchestrate.train import run_training
from pipeline.tracking.runs import client_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _config(digits_recipe, tmp_path, *overrides):
    return digits_recipe(tmp_path, *overrides, experiment="integration-ft")


def test_ray_data_streaming_path_trains(ray_address, digits_recipe, mlflow_server, tmp_path):
    # Ray Data's read tasks need a CPU besides the two workers' (shared/NOTES): 0.5 CPU per worker.
    config = _config(digits_recipe, tmp_path, "run.epochs=6", 'data.loader="ray_data"', "scaling.cpus_per_worker=0.5")
    summary = run_training(config, config_name="stream")
    client = client_for(mlflow_server)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["data.loader_used"] == "ray_data"
    images = [m.value for m in client.get_metric_history(summary.mlflow_run_id, "train/images_per_s")]
    assert len(images) == 6
    assert summary.val_clean_acc > 0.5, summary


def test_ray_data_refuses_a_cluster_without_spare_cpu(ray_address, digits_recipe, tmp_path):
    from pipeline.config import ConfigError

    config = _config(digits_recipe, tmp_path, 'data.loader="ray_data"')
    with pytest.raises(ConfigError, match=r"scaling\.cpus_per_worker"):
        run_training(config, config_name="stream")
