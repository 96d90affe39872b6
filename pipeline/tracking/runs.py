"""MLflow runs: the tracking URI, runs addressed by explicit run id (the driver creates the run, rank 0
logs into it), per-epoch metrics, events, tags and artifacts. The model store is model_store.py; with
registry.py and gates.py, pipeline/tracking is the only place that imports mlflow.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.tracking import MlflowClient

from pipeline.errors import TrackingError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "advtrain.run_name"
DEFAULT_STORE = "mlruns"


def resolve_tracking_uri(configured: str = "", *, cwd: str | Path | None = None) -> str:
    """config `tracking.uri`, else MLFLOW_TRACKING_URI, else sqlite in ./mlruns; always absolute.

    Ray workers chdir elsewhere, so relative sqlite paths are made absolute here on the driver.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    base = Path(cwd or Path.cwd())
    if not uri:
        (base / DEFAULT_STORE).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(base / DEFAULT_STORE / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():
            path = (base / path).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("sqlite")):
        raise TrackingError(
            f"tracking URI '{uri}': MLflow 3 refuses the plain file store; use sqlite:///path/mlflow.db "
            "or http://HOST:PORT of an `mlflow server`"
        )
    return uri


def code_in(err: MlflowException, codes: tuple[int, ...]) -> bool:
    """Whether MLflow's error carries one of `codes` (databricks_pb2 error codes)."""
    return err.error_code in {ErrorCode.Name(code) for code in codes}


def client_for(uri: str) -> MlflowClient:
    """A client of the store at `uri`; an http(s) server is checked to answer first, as MLflow's own
    retries would spend minutes on a dead address and then fail with a connection traceback."""
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@functools.cache
def check_reachable(uri: str) -> None:
    """TrackingError unless something answers HTTP at `uri` (any status: a 401 of an auth server is an
    answer, and says nothing about the credentials, which MLflow's own calls check)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):
            # It answered TLS: reachable. Its certificate is MLflow's business, which honours
            # MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH and this probe does not.
            return
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or fix tracking.uri / "
            "MLFLOW_TRACKING_URI"
        ) from None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it or set tracking.experiment")
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the local database instead of a cwd-relative ./mlruns.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The MLflow run id recorded for an advtrain run name, or None."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    return runs[0].info.run_id if runs else None


def start_or_resume_run(
    uri: str, *, experiment: str, run_name: str, params: dict[str, Any], config_toml: str, tags: dict[str, str]
) -> tuple[str, bool]:
    """Create the run (params, tags, config artifact), or reopen the one with this run name.

    A resumed run must have the same params: nothing already recorded is overwritten.
    Returns (run_id, resumed).
    """
    client = client_for(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    existing = find_run(uri, experiment, run_name)
    str_params = {k: str(v) for k, v in params.items()}
    if existing:
        logged = client.get_run(existing).data.params
        changed = {k: (logged.get(k), v) for k, v in str_params.items() if logged.get(k) != v}
        if changed:
            lines = ", ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()))
            raise TrackingError(
                f"run '{run_name}' exists in MLflow with other params ({lines}); resume it with its "
                "original config or start a new run (leave run.name empty for a unique one)"
            )
        client.update_run(existing, status="RUNNING")
        return existing, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    run_id = run.info.run_id
    items = list(str_params.items())
    for start in range(0, len(items), 100):  # MLflow's log_batch limit is 100 params per call
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(config_toml)
        client.log_artifact(run_id, str(path))
    return run_id, False


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client_for(uri).set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client_for(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_epoch(uri: str, run_id: str, metrics: dict[str, float], *, epoch: int) -> None:
    """All of one epoch's metrics in one call, step=epoch. Rank 0 only."""
    now = int(time.time() * 1000)
    client_for(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def record_event(
    uri: str, run_id: str, tag: str, events: list[dict[str, Any]], *, epoch: int, metrics: dict[str, float]
) -> None:
    """A training event (e.g. catastrophic overfitting): every event so far as a JSON tag, plus metrics
    at step=epoch so the event shows on the run's charts."""
    now = int(time.time() * 1000)
    client_for(uri).log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()],
        tags=[RunTag(tag, json.dumps(events))],
    )


def logged_epochs(uri: str, run_id: str, key: str) -> set[int]:
    return {m.step for m in client_for(uri).get_metric_history(run_id, key)}


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client_for(uri).get_metric_history(run_id, key))


# --------------------------------------------------------------------------- models


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(client_for(uri).get_run(run_id).data.tags)


def run_params(uri: str, run_id: str) -> dict[str, str]:
    return dict(client_for(uri).get_run(run_id).data.params)


def log_artifacts(uri: str, run_id: str, folder: str | Path, artifact_path: str) -> None:
    client_for(uri).log_artifacts(run_id, str(folder), artifact_path=artifact_path)


def set_version_tags(uri: str, name: str, version: str, tags: dict[str, Any]) -> None:
    client = client_for(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def start_system_metrics(uri: str, run_id: str, *, interval_s: float, resume: bool) -> Any | None:
    """MLflow's system-metrics monitor on `run_id` (a thread sampling this node every `interval_s`: CPU,
    memory, disk, network, and each GPU's utilisation and memory through NVML); None when it is off
    (interval 0) or cannot start. `resume` continues the run's earlier system-metric steps. Call
    `.finish()` on it when training ends; it also stops by itself once the run is no longer RUNNING."""
    if interval_s <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    except (MlflowException, OSError, ImportError) as err:  # metrics are a convenience: training goes on
        log.warning("system metrics off for run %s: %s", run_id, err)
        return None
    monitor.start()
    return monitor
