"""End to end on a real local Ray instance (2 Train workers) and a real `mlflow server` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import to_toml
from pipeline.orchestrate.train import run_training
from pipeline.tracking.runs import client_for
from pipeline.training.steps import bf16_is_native

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PER_EPOCH_KEYS = [
    "train/loss",
    "train/acc",
    "train/eps",
    "val/clean_acc",
    "val/robust_acc",
    "val/probe_pgd_acc",
    "time/epoch_s",
]


def _config(digits_recipe, tmp_path, *overrides):
    return digits_recipe(tmp_path, *overrides, experiment="integration", registered_model="digits-it")


@pytest.fixture(scope="module")
def trained(ray_address, digits_recipe, tmp_path_factory, standard_baseline):
    tmp = tmp_path_factory.mktemp("train")
    adversarial = run_training(
        _config(
            digits_recipe, tmp, "run.epochs=20", 'run.mixed_precision="auto"', "tracking.system_metrics_interval_s=1"
        ),
        config_name="at",
    )
    return adversarial, standard_baseline


def test_one_metric_value_per_epoch(trained, mlflow_server):
    adversarial, _ = trained
    client = client_for(mlflow_server)
    for key in PER_EPOCH_KEYS:
        steps = [m.step for m in client.get_metric_history(adversarial.mlflow_run_id, key)]
        assert sorted(steps) == list(range(1, 21)), key
    run = client.get_run(adversarial.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["attack.eps"] == "0.2" and run.data.params["scaling.num_workers"] == "2"
    assert "config.toml" in [a.path for a in client.list_artifacts(adversarial.mlflow_run_id)]
    # "auto" resolved on the workers' device (both ranks: the same CPU): bf16 only with bf16 hardware.
    assert run.data.params["run.mixed_precision"] == "auto"
    assert run.data.tags["advtrain.mixed_precision"] == ("bf16" if bf16_is_native(torch.device("cpu")) else "none")
    # Rank 0's node sampled every second while it trained (GPU keys appear where NVML finds GPUs).
    assert client.get_metric_history(adversarial.mlflow_run_id, "system/cpu_utilization_percentage")
    assert json.loads(run.data.tags["advtrain.devices"]) == ["cpu", "cpu"]  # each rank's device


def test_adversarial_training_beats_standard_by_30_points(trained):
    adversarial, standard = trained
    assert standard.test_clean_acc > 0.85, "the baseline should at least learn the task"
    assert adversarial.val_robust_acc - standard.val_robust_acc >= 0.30, (adversarial, standard)
    assert adversarial.test_robust_acc - standard.test_robust_acc >= 0.30, (adversarial, standard)


def test_registered_version_loads_in_fresh_process_and_reproduces_test_accuracy(trained, mlflow_server, digits_path):
    adversarial, standard = trained
    client = client_for(mlflow_server)
    version = client.get_model_version("digits-it", str(adversarial.model_version))
    assert version.tags["weights_sha256"] == adversarial.weights_sha256
    assert version.tags["threat_model.norm"] == "linf" and version.tags["threat_model.eps"] == "0.2"
    assert version.tags["dataset"] == "sklearn.datasets.load_digits"
    # Each new version becomes the `challenger`; `champion` is left to promotion.
    assert int(adversarial.model_version) > int(standard.model_version)
    assert client.get_model_version_by_alias("digits-it", "challenger").version == str(adversarial.model_version)
    logged = client.get_metric_history(adversarial.mlflow_run_id, "test/clean_acc")[-1].value
    from pipeline.tracking.model_store import resolve_model
    from pipeline.tracking.runs import TrackingError

    by_run = resolve_model(f"runs:/{adversarial.mlflow_run_id}/model", tracking_uri=mlflow_server)
    assert by_run.weights_sha256 == adversarial.weights_sha256 and by_run.run_id == adversarial.mlflow_run_id
    with pytest.raises(TrackingError, match="no MLflow run with id"):
        resolve_model("runs:/0123456789abcdef/model", tracking_uri=mlflow_server)
    code = f"""
import sys, json, torch, mlflow.pyfunc
from pipeline.tracking.model_store import load_model
from pipeline.data import load_split
from pipeline.training.validation import predict
model = load_model("models:/digits-it/{adversarial.model_version}")
x, y = load_split({str(digits_path)!r}, "test")
pred = predict(model, x, batch_size=256, device=torch.device("cpu"))
pyfunc = mlflow.pyfunc.load_model("models:/digits-it/{adversarial.model_version}")
same = bool((torch.from_numpy(pyfunc.predict(x.numpy())).argmax(1) == pred).all())
unpickled = sorted(m for m in sys.modules if m == "pickle" and False)
print(json.dumps({{"acc": float((pred == y).float().mean()), "pyfunc_same": same, "training": model.training}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["acc"] == logged
    assert out["pyfunc_same"] and out["training"] is False


def test_tampered_weights_are_refused(trained, tmp_path):
    from pipeline.model_folder import load_weights, save_weights
    from pipeline.models import build_model
    from pipeline.tracking.model_store import load_model
    from pipeline.tracking.runs import TrackingError

    arch = {
        "name": "small_cnn",
        "width": 1,
        "depth": 16,
        "shape": [1, 8, 8],
        "num_classes": 10,
        "mean": [0.3],
        "std": [0.4],
    }
    save_weights(build_model(arch), arch, tmp_path)
    assert load_weights(tmp_path).training is False
    weights = tmp_path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(TrackingError, match="does not match the recorded"):
        load_model(str(tmp_path))


def test_interrupted_run_resumes_with_one_value_per_epoch(
    ray_address, digits_recipe, mlflow_server, tmp_path, committed_epoch
):
    config = _config(digits_recipe, tmp_path, "run.epochs=5", 'run.name="resume-me"', "data.batch_size=32")
    config_file = tmp_path / "resume.toml"
    config_file.write_text(to_toml(config))
    command = [
        str(Path(sys.executable).with_name("advtrain")),
        "train",
        "--config",
        str(config_file),
        "--ray-address",
        ray_address,
    ]
    client = client_for(mlflow_server)

    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline:
        experiment = client.get_experiment_by_name("integration")
        if run_id is None and experiment is not None:
            runs = client.search_runs(
                [experiment.experiment_id], filter_string="tags.`advtrain.run_name` = 'resume-me'"
            )
            run_id = runs[0].info.run_id if runs else None
        if run_id and committed_epoch(tmp_path / "runs" / "resume-me") >= 2:
            break
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run, like a lost head-node process
    first.wait()
    interrupted_at = committed_epoch(tmp_path / "runs" / "resume-me")
    assert 2 <= interrupted_at < 5

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(output)
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from the checkpoint of epoch {interrupted_at}" in output
    assert f"epoch {interrupted_at + 1:3d}/5" in output
    assert f"epoch {interrupted_at:3d}/5" not in output
    for key in PER_EPOCH_KEYS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5], key
    assert client.get_run(run_id).info.status == "FINISHED"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already finished" in again.stderr
