"""Bring your own model and data on the shared local Ray: a user's package (outside pipeline/, with its own
normalisation and a tuple output) trained on PNG/JPEG class folders that Ray Data streams because they
exceed data.memory_limit_mb, registered, then evaluated by `advtrain evaluate` in a fresh process started
in another folder without the package on its path: its code comes from the model version.
(Worker and node failures: tests/cluster.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from image_files import write_image_folder
from user_package import write_user_package

from pipeline.data.image_sources import prepare_images
from pipeline.orchestrate.train import run_training
from pipeline.tracking.runs import client_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_user_model_streams_images_registers_and_evaluates_elsewhere(
    ray_address, digits_recipe, mlflow_server, tmp_path, monkeypatch
):
    module = write_user_package(tmp_path / "user_src")
    monkeypatch.chdir(tmp_path / "user_src")  # the user runs advtrain from their project folder
    images = write_image_folder(tmp_path / "photos", per_class=100)
    data = tmp_path / "data"
    info = prepare_images(images, data)
    assert info.encoded
    config = digits_recipe(
        tmp_path,
        f'data.path="{data}"',
        f'model.name="{module}:build"',
        "model.kwargs={ width = 16, classes = 3 }",
        "model.normalize={ mean = [0.5], std = [0.25] }",
        "model.output=0",
        "data.memory_limit_mb=0.01",  # the train split is ~0.2 MiB as float32: streamed
        "data.batch_size=16",
        "optim.lr=0.01",
        "run.epochs=2",
        "attack.eps=0.05",
        "scaling.cpus_per_worker=0.5",  # Ray Data's tasks need a CPU besides the workers'
        experiment="integration-byo",
        registered_model="user-it",
    )
    summary = run_training(config, config_name="byo")
    client = client_for(mlflow_server)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["data.loader_used"] == "ray_data"
    assert len(client.get_metric_history(summary.mlflow_run_id, "train/images_per_s")) == 2
    assert summary.val_clean_acc > 0.6, summary

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    out = elsewhere / "report"
    command = [str(Path(sys.executable).with_name("advtrain")), "evaluate", "--model", "models:/user-it/1"]
    command += ["--protocol", "fast", "--num-examples", "24", "--out", str(out), "--ray-address", ray_address]
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["weights_sha256"] == summary.weights_sha256
    assert report["model"]["architecture"] == f"{module}:build"
    assert report["clean_accuracy"] > 0.6 and 0.0 <= report["robust_accuracy"] <= report["clean_accuracy"]
    version = client.get_model_version("user-it", "1")
    assert version.tags["eval.weights_sha256"] == summary.weights_sha256


def test_ray_data_refuses_a_cluster_without_spare_cpu(ray_address, digits_recipe, tmp_path):
    from pipeline.config import ConfigError

    config = digits_recipe(tmp_path, 'data.loader="ray_data"', experiment="integration-ft")
    with pytest.raises(ConfigError, match=r"scaling\.cpus_per_worker"):
        run_training(config, config_name="stream")
