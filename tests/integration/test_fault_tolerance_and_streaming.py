"""Worker failure recovery (FailureConfig) and the Ray Data streaming path, on the shared local Ray."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.tracking import client_for
from pipeline.train import run_training

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _config(digits_recipe, tmp_path, *overrides):
    return digits_recipe(tmp_path, *overrides, experiment="integration-ft")


def test_killed_worker_is_restarted_and_resumes_from_checkpoint(
    ray_address, digits_recipe, mlflow_server, tmp_path, committed_epoch
):
    from ray.util.state import list_actors

    config = _config(
        digits_recipe,
        tmp_path,
        "run.epochs=5",
        'run.name="worker-dies"',
        "scaling.max_failures=1",
        "data.batch_size=32",
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_training(config, config_name="ft")))
    thread.start()
    deadline = time.time() + 300
    while committed_epoch(tmp_path / "runs" / "worker-dies") < 2:
        assert time.time() < deadline and thread.is_alive(), outcome
        time.sleep(0.1)
    workers = list_actors(address=ray_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(int(workers[-1].pid), signal.SIGKILL)
    thread.join(timeout=600)
    summary = outcome["summary"]
    client = client_for(mlflow_server)
    for key in ("train/loss", "val/robust_acc"):
        assert sorted(m.step for m in client.get_metric_history(summary.mlflow_run_id, key)) == [1, 2, 3, 4, 5]
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    assert summary.val_clean_acc > 0.5


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
