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
# MLflow draws a progress bar per artifact download; it only buries test output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
def mlflow_server(mlflow_server_root) -> str:
    """The URI of a real `mlflow server` process on 127.0.0.1 (sqlite backend, proxied artifacts)."""
    return mlflow_server_root[0]


def _start_mlflow_server(root: Path, *, extra_args: tuple[str, ...] = (), extra_env: dict | None = None):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
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
            *extra_args,
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
    return uri, proc, log


def _stop(proc, log) -> None:
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def mlflow_server_root(tmp_path_factory):
    """Starts the server; yields (uri, folder holding its database and artifact store)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    uri, proc, log = _start_mlflow_server(root)
    yield uri, root
    _stop(proc, log)


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory):
    """An `mlflow server --app-name basic-auth` on loopback; yields (uri, admin user, admin password)."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = "test-" + os.urandom(6).hex()
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    uri, proc, log = _start_mlflow_server(
        root,
        extra_args=("--app-name", "basic-auth"),
        extra_env={
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
        },
    )
    yield uri, "admin", password
    _stop(proc, log)


def free_port_block() -> int:
    """A port P with P, P+1 and P+100 unused (infra/local/start_cluster.sh gives each node ports above P)."""
    for base in range(21000, 40000, 500):
        try:
            for port in (base, base + 1, base + 100):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


@pytest.fixture(scope="session")
def port_block():
    """A function: () -> a free port block (free_port_block)."""
    return free_port_block


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray instance (2 CPUs, loopback) for every integration test; its GCS address.

    A second Ray instance, idle, runs beside it all along, as another user's or command's would on a
    shared machine: every training run and search here proves that advtrain's processes keep to their
    own cluster (Ray Train's placement-group cleaner once resolved "auto", found two and died)."""
    import ray

    from pipeline.orchestrate.train import init_ray

    neighbour = tmp_path_factory.mktemp("neighbour-ray")
    port = free_port_block()
    start = [str(ROOT / "infra/local/start_cluster.sh"), "--dir", str(neighbour), "--workers", "0", "--cpus", "0"]
    start += ["--port", str(port), "--dashboard-port", str(port + 2), "--no-mlflow"]
    started = subprocess.run(start, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        init_ray(num_cpus=2)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()
    finally:
        stop = [str(ROOT / "infra/local/stop_cluster.sh"), "--dir", str(neighbour), "--grace", "2"]
        subprocess.run(stop, capture_output=True, timeout=120)


def train_in_process(digits_path, *, method: str, epochs: int, seed: int = 0, attack: dict | None = None):
    """A small_cnn trained on digits without Ray (the one `Trainer`, in this process): real models for
    attack/eval tests. The last epoch's weights; validation kept small, as only the weights are wanted."""
    from pipeline.config import config_from_dict
    from pipeline.training import fit_in_process

    config = config_from_dict(
        {
            "run": {"epochs": epochs, "seed": seed, "keep_best": False},
            "data": {"path": str(digits_path), "batch_size": 64},
            "attack": {"eps": 0.2, "num_steps": 7, **(attack or {})},
            # The guard's probe would be 32 examples here: too few to judge a collapse by.
            "method": {"name": method, "co_guard": False},
            "schedule": {"eps_ramp": "linear", "eps_ramp_epochs": 5},
            "optim": {"name": "adam", "lr": 0.001 if method != "standard" else 0.002, "weight_decay": 0.0},
            "validation": {"num_examples": 32, "num_steps": 2},
        }
    )
    model, arch, _ = fit_in_process(config)
    return model.eval(), arch


@pytest.fixture(scope="session")
def undefended(digits_path):
    """small_cnn trained normally on digits for a few epochs (~2 s): accurate and undefended."""
    return train_in_process(digits_path, method="standard", epochs=8)[0]


@pytest.fixture(scope="session")
def adversarially_trained(digits_path, tmp_path_factory):
    """PGD-AT small_cnn on digits (Linf eps=0.2), saved as a model folder; (model, folder)."""
    from pipeline.model_folder import save_weights

    model, arch = train_in_process(digits_path, method="pgd_at", epochs=25)
    folder = tmp_path_factory.mktemp("at-model")
    save_weights(model, arch, folder)
    return model, folder


@pytest.fixture
def committed_epoch():
    """A function: run folder -> the epoch of the checkpoint Ray Train has committed (what a
    resubmission resumes from)."""
    return _committed_epoch


def _committed_epoch(run_dir: Path) -> int:
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


@pytest.fixture(scope="session")
def digits_recipe(digits_path, mlflow_server):
    """A function: (tmp_path, *overrides, experiment=, registered_model=) -> the digits demo recipe as a
    run config pointed at the session's digits data, a run folder under tmp_path and the MLflow server."""
    from pipeline.config import load_config

    def make(tmp_path, *overrides: str, experiment: str, registered_model: str = ""):
        return load_config(
            ROOT / "jobs/configs/digits_demo.toml",
            [
                f'data.path="{digits_path}"',
                f'run.storage_path="{tmp_path / "runs"}"',
                f'tracking.uri="{mlflow_server}"',
                f'tracking.experiment="{experiment}"',
                f'tracking.registered_model="{registered_model}"',
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="session")
def standard_baseline(ray_address, digits_recipe, tmp_path_factory):
    """One standard-training run (8 epochs, 2 Ray workers, registered as digits-it) that every
    'beats standard training' test compares against. It ships its last epoch: its best-robust epoch
    would be an undertrained early one."""
    from pipeline.orchestrate.train import run_training

    config = digits_recipe(
        tmp_path_factory.mktemp("standard"),
        "run.epochs=8",
        "schedule.eps_ramp_epochs=2",
        "optim.lr=0.003",
        'method.name="standard"',
        "run.keep_best=false",
        experiment="integration",
        registered_model="digits-it",
    )
    return run_training(config, config_name="std")
