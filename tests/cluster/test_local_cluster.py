"""The cluster flow on real processes: infra/local starts a head + 2 worker nodes (each its own raylet
with 1 CPU, token auth on, loopback) and an MLflow server; jobs/train.py is submitted through the Jobs
API; the run's workers sit on two different nodes and the model lands in that server's registry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port_block() -> int:
    """A port P with P..P+400 unused (the script gives each node ports above P)."""
    for base in range(21000, 40000, 500):
        ports = [base, base + 1, *range(base + 100, base + 400)]
        try:
            for port in ports[:3]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, digits_path):
    folder = tmp_path_factory.mktemp("cluster")
    port = _free_port_block()
    dashboard, mlflow_port = port + 2, port + 3
    start = subprocess.run(
        [
            str(ROOT / "infra/local/start_cluster.sh"),
            "--dir",
            str(folder),
            "--workers",
            "2",
            "--cpus",
            "1",
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard),
            "--mlflow-port",
            str(mlflow_port),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield {
            "dir": folder,
            "jobs": f"http://127.0.0.1:{dashboard}",
            "tracking": f"http://127.0.0.1:{mlflow_port}",
            "token": (folder / "auth_token").read_text().strip(),
            "digits": digits_path,
        }
    finally:
        subprocess.run([str(ROOT / "infra/local/stop_cluster.sh"), "--dir", str(folder)], timeout=120)


def test_token_auth_refuses_unauthenticated_jobs_requests(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster['jobs']}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(
        f"{cluster['jobs']}/api/jobs/", headers={"Authorization": f"Bearer {cluster['token']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and isinstance(json.loads(response.read()), list)


def test_submitted_training_job_spans_two_nodes_and_registers_the_model(cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.tracking import client_for

    # A new process would read RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH (what `source DIR/env` sets); this one
    # already has Ray's auth settings loaded, so it passes the token the way any HTTP client can.
    client = JobSubmissionClient(cluster["jobs"], headers={"Authorization": f"Bearer {cluster['token']}"})
    storage = cluster["dir"] / "runs"
    # Code by path, not working_dir: the nodes of a one-machine cluster share Ray's session folder, and
    # one node's runtime-env agent deletes an uploaded working_dir that another node's driver still
    # runs in (seen here). A real cluster has a disk per node; there, jobs/runtime_env.yaml ships it.
    job = client.submit_job(
        entrypoint=(
            f"python {ROOT}/jobs/train.py --config {ROOT}/jobs/configs/digits_demo.toml --set run.epochs=3 "
            f"--set 'data.path=\"{cluster['digits']}\"' --set 'run.storage_path=\"{storage}\"' "
            "--set 'run.name=\"on-the-cluster\"' --set 'tracking.registered_model=\"digits-cluster\"'"
        ),
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(ROOT),
                "MLFLOW_TRACKING_URI": cluster["tracking"],
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            },
        },
    )
    deadline = time.monotonic() + 480
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "run on-the-cluster finished" in logs

    mlflow = client_for(cluster["tracking"])
    run = mlflow.search_runs(
        [mlflow.get_experiment_by_name("advtrain-demo").experiment_id],
        filter_string="tags.`advtrain.run_name` = 'on-the-cluster'",
    )[0]
    nodes = json.loads(run.data.tags["advtrain.worker_nodes"])
    assert len(nodes) == 2 and len(set(nodes)) == 2, "each 1-CPU node fits one worker: two nodes"
    assert run.info.status == "FINISHED"
    versions = mlflow.search_model_versions("name = 'digits-cluster'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert os.path.isdir(storage / "on-the-cluster")
