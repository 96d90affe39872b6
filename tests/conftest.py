"""Shared fixtures. Unit tests never start Ray; integration tests share one local Ray instance and one
real `mlflow server` process on 127.0.0.1 (sqlite backend), both shut down after the session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory) -> Path:
    from pipeline.data import prepare_digits

    path = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a sqlite backend and proxied artifacts; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")  # noqa: SIM115 - stays open while the server runs
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance (2 CPUs, loopback) for every integration test; its GCS address."""
    import ray

    from pipeline.train import init_ray

    init_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
