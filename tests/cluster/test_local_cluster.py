"""The cluster flow on real processes: infra/local starts a head + 2 worker nodes (each its own raylet
with 1 CPU, token auth on, loopback) and an MLflow server; jobs/train.py is submitted through the Jobs
API; the run's workers sit on two different nodes and the model lands in that server's registry."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, digits_path, port_block):
    folder = tmp_path_factory.mktemp("cluster")
    port = port_block()
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
        # A short grace: the head's `ray start` sat out the whole default 15 s after SIGTERM every run,
        # and nothing of this throwaway cluster needs a clean shutdown.
        stop = [str(ROOT / "infra/local/stop_cluster.sh"), "--dir", str(folder), "--grace", "2"]
        subprocess.run(stop, timeout=120)


def test_token_auth_refuses_unauthenticated_jobs_requests(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster['jobs']}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(
        f"{cluster['jobs']}/api/jobs/", headers={"Authorization": f"Bearer {cluster['token']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and isinstance(json.loads(response.read()), list)


def _jobs_client(cluster):
    from ray.job_submission import JobSubmissionClient

    # A new process would read RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH (what `source DIR/env` sets); this one
    # already has Ray's auth settings loaded, so it passes the token the way any HTTP client can.
    return JobSubmissionClient(cluster["jobs"], headers={"Authorization": f"Bearer {cluster['token']}"})


def _submit_training(cluster, run_name: str, *overrides: str) -> str:
    """Submit jobs/train.py (the digits demo recipe with `overrides`) through the Jobs API; the job id."""
    sets = [
        f'data.path="{cluster["digits"]}"',
        f'run.storage_path="{cluster["dir"] / "runs"}"',
        f'run.name="{run_name}"',
        *overrides,
    ]
    # Code by path, not working_dir: the nodes of a one-machine cluster share Ray's session folder, and
    # one node's runtime-env agent deletes an uploaded working_dir that another node's driver still
    # runs in (seen here). A real cluster has a disk per node; there, jobs/runtime_env.yaml ships it.
    return _jobs_client(cluster).submit_job(
        entrypoint=f"python {ROOT}/jobs/train.py --config {ROOT}/jobs/configs/digits_demo.toml "
        + " ".join(f"--set '{item}'" for item in sets),
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(ROOT),
                "MLFLOW_TRACKING_URI": cluster["tracking"],
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            },
        },
    )


def _wait_for_job(cluster, job: str, timeout: float = 480):
    from ray.job_submission import JobStatus

    client = _jobs_client(cluster)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    return status, client.get_job_logs(job)


def _wait_for_epoch(cluster, job: str, run_name: str, epoch: int, committed_epoch) -> int:
    """Block until the run has committed a checkpoint of `epoch` or later; that epoch."""
    from ray.job_submission import JobStatus

    client = _jobs_client(cluster)
    deadline = time.monotonic() + 300
    while (reached := committed_epoch(cluster["dir"] / "runs" / run_name)) < epoch:
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.2)
    return reached


def _node_groups(cluster) -> dict[str, int]:
    """Node (or server) name -> the process group start_cluster.sh recorded for it in DIR/pids."""
    lines = (cluster["dir"] / "pids").read_text().splitlines()
    return {name: int(pgid) for pgid, name in (line.split() for line in lines)}


def _train_workers(cluster) -> list[tuple[int, str]]:
    """(pid, node name) of every live Ray Train worker process of this cluster, read from /proc: a
    process belongs to the node whose recorded `ray start` process (DIR/pids) it descends from."""
    groups = {pid: name for name, pid in _node_groups(cluster).items()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
        except OSError:
            continue
        pid = int(entry.name)
        while pid > 1 and pid not in groups:
            try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pid = 0
        if pid in groups:
            found.append((int(entry.name), groups[pid]))
    return found


def _wait_for_workers(cluster, count: int, *, excluding: set[int] = frozenset()) -> list[tuple[int, str]]:
    deadline = time.monotonic() + 120
    while len(workers := [w for w in _train_workers(cluster) if w[0] not in excluding]) < count:
        assert time.monotonic() < deadline, f"{count} Ray Train workers never showed up: {workers}"
        time.sleep(0.2)
    return workers


def _run_of(cluster, run_name: str):
    from pipeline.tracking.runs import client_for

    mlflow = client_for(cluster["tracking"])
    runs = mlflow.search_runs(
        [mlflow.get_experiment_by_name("advtrain-demo").experiment_id],
        filter_string=f"tags.`advtrain.run_name` = '{run_name}'",
    )
    assert len(runs) == 1, f"one MLflow run per run name, got {len(runs)}"
    return mlflow, runs[0]


def _assert_recovered(cluster, run_name: str, logs: str, *, epochs: int, killed_at_epoch: int) -> float:
    """The run finished after exactly one restart from the checkpoint that was committed when the
    failure happened, with one MLflow value per epoch per metric and its model registered; returns
    the time the restart logged (unix seconds)."""
    mlflow, run = _run_of(cluster, run_name)
    assert run.info.status == "FINISHED", logs[-3000:]
    restarts = json.loads(run.data.tags["advtrain.restarts"])
    assert len(restarts) == 1, restarts
    # Rank 0 may commit one more epoch between the kill and the failure reaching the controller.
    assert killed_at_epoch <= restarts[0]["from_epoch"] <= killed_at_epoch + 1 < epochs, restarts
    assert f"resuming from the checkpoint of epoch {restarts[0]['from_epoch']}" in logs
    for key in ("train/loss", "val/robust_acc", "val/clean_acc", "time/epoch_s"):
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    for key in run.data.metrics:  # every metric, per-epoch or once per run: no step logged twice
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    versions = mlflow.search_model_versions(f"name = '{run_name}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    return restarts[0]["unix_time"]


def test_submitted_job_spans_two_nodes_survives_a_killed_worker_and_registers_the_model(cluster, committed_epoch):
    """One job for two claims (each job costs CI half a minute): the run's workers sit on two nodes and
    the model lands in the cluster's registry, and a worker process killed mid-run (SIGKILL, by PID)
    costs a restart from the last checkpoint, not the run."""
    from ray.job_submission import JobStatus

    epochs, name = 8, "on-the-cluster"
    job = _submit_training(
        cluster, name, f"run.epochs={epochs}", "scaling.max_failures=1", f'tracking.registered_model="{name}"'
    )
    killed_at_epoch = _wait_for_epoch(cluster, job, name, 2, committed_epoch)
    workers = _wait_for_workers(cluster, 2)
    assert len({node for _, node in workers}) == 2, f"each 1-CPU node fits one worker: two nodes, got {workers}"
    pid, node = workers[-1]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    status, logs = _wait_for_job(cluster, job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"run {name} finished" in logs
    resumed_at = _assert_recovered(cluster, name, logs, epochs=epochs, killed_at_epoch=killed_at_epoch)

    _, run = _run_of(cluster, name)
    nodes = json.loads(run.data.tags["advtrain.worker_nodes"])
    assert len(nodes) == 2 and len(set(nodes)) == 2, "the restarted group spans two nodes too"
    assert os.path.isdir(cluster["dir"] / "runs" / name)
    print(f"\nworker process killed on {node}: training resumed {resumed_at - killed_at:.1f} s later")


def test_more_failures_than_max_failures_fail_the_job_and_register_nothing(cluster, committed_epoch):
    from ray.job_submission import JobStatus

    epochs, name = 12, "fails-twice"
    job = _submit_training(
        cluster, name, f"run.epochs={epochs}", "scaling.max_failures=1", f'tracking.registered_model="{name}"'
    )
    reached = _wait_for_epoch(cluster, job, name, 1, committed_epoch)
    first = _wait_for_workers(cluster, 2)
    os.kill(first[0][0], signal.SIGKILL)  # failure 1: within max_failures, the group restarts
    # Failure 2 once the new group trains (a commit past the first failure): Ray Train counts a worker
    # lost while a group is still starting as a start-up failure, not against max_failures.
    _wait_for_epoch(cluster, job, name, reached + 2, committed_epoch)
    second = _wait_for_workers(cluster, 2, excluding={pid for pid, _ in first})
    os.kill(second[0][0], signal.SIGKILL)  # failure 2: one more than max_failures allows
    status, logs = _wait_for_job(cluster, job)
    assert status == JobStatus.FAILED, logs[-4000:]

    mlflow, run = _run_of(cluster, name)
    assert run.info.status == "FAILED"
    assert mlflow.search_model_versions(f"name = '{name}'") == []
    assert committed_epoch(cluster["dir"] / "runs" / name) < epochs


# Last in this module: the cluster has one worker node less afterwards.
def test_killed_worker_node_restarts_on_the_remaining_nodes(cluster, committed_epoch):
    from ray.job_submission import JobStatus

    epochs, name = 8, "node-killed"
    job = _submit_training(
        cluster, name, f"run.epochs={epochs}", "scaling.max_failures=1", f'tracking.registered_model="{name}"'
    )
    killed_at_epoch = _wait_for_epoch(cluster, job, name, 2, committed_epoch)
    workers = _wait_for_workers(cluster, 2)
    node = next(node for _, node in workers if node != "head")
    # The node's `ray start`, raylet and agents (one process group) and its Train worker, which Ray
    # starts in a session of its own: left alive, it trains on until it notices its raylet is gone,
    # and rank 0 commits epochs a dead node could never have reached (seen in CI: 2 more).
    os.killpg(_node_groups(cluster)[node], signal.SIGKILL)
    for pid, _ in (w for w in workers if w[1] == node):
        with contextlib.suppress(ProcessLookupError):  # gone already where it was in the group
            os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    status, logs = _wait_for_job(cluster, job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    resumed_at = _assert_recovered(cluster, name, logs, epochs=epochs, killed_at_epoch=killed_at_epoch)
    _, run = _run_of(cluster, name)
    before, after = (
        json.loads(run.data.tags["advtrain.restarts"])[0]["worker_nodes"],
        json.loads(run.data.tags["advtrain.worker_nodes"]),
    )
    assert before == after and len(after) == 2, "the tag holds the restarted group's placement"
    print(f"\nworker node {node} killed: training resumed {resumed_at - killed_at:.1f} s later")
