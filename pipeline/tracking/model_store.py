"""The model store on MLflow: weights as safetensors + an architecture JSON (no pickle), logged with a
run and registered as a version, wrapped in an MLflow "models from code" pyfunc so
`mlflow.pyfunc.load_model` works too; and the way back: resolving and loading any model reference.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.data import sha256_file
from pipeline.errors import ModelError, checked_name
from pipeline.model_folder import (
    ARCH_FILE,
    WEIGHTS_FILE,
    load_folder,
    model_files,
    save_weights,
)
from pipeline.models import code_location, is_import_path
from pipeline.tracking.runs import TrackingError, client_for, resolve_tracking_uri

PYFUNC_SCRIPT = Path(__file__).with_name("pyfunc.py")
# A version number as MLflow stores it (str.isdigit() also takes '²', which MLflow's int() refuses).
VERSION_NUMBER = re.compile(r"[0-9]{1,9}")


def log_and_register_model(
    uri: str,
    run_id: str,
    *,
    model: nn.Module,
    arch: dict[str, Any],
    registered_model: str,
    version_tags: dict[str, Any],
    alias: str = "",
) -> dict[str, Any]:
    """Log the model to the run (pyfunc from code, safetensors) and register a new version.

    Returns {"weights_sha256", "model_uri", "version"} (version None when registered_model is empty).
    Rank 0 / driver only.
    """
    with _global_uris(uri):
        return _log_and_register(
            uri,
            run_id,
            model=model,
            arch=arch,
            registered_model=registered_model,
            version_tags=version_tags,
            alias=alias,
        )


@contextlib.contextmanager
def _global_uris(uri: str) -> Iterator[None]:
    """The fluent log_model/register_model use the process-global tracking and registry URIs, and
    setting them also exports MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to child processes. Set them
    for one call and put back exactly what was there (unset stays unset), so later clients and
    subprocesses of this process are not silently pointed at this server."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _log_and_register(
    uri: str,
    run_id: str,
    *,
    model: nn.Module,
    arch: dict[str, Any],
    registered_model: str,
    version_tags: dict[str, Any],
    alias: str,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        digest = save_weights(model, arch, folder)
        # The pipeline package, so the pyfunc imports pipeline.models wherever it loads; and a user model's
        # package or module, which MLflow keeps in the version's code/ folder (pipeline.model_folder).
        code_paths = [str(Path(__file__).parents[1])]
        if is_import_path(arch["name"]):
            code_paths.append(str(code_location(arch["name"])))
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # The pyfunc takes raw pixel arrays; MLflow's type-hint nudge does not apply.
            warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_SCRIPT),
                artifacts={"weights": str(folder / WEIGHTS_FILE), "architecture": str(folder / ARCH_FILE)},
                code_paths=code_paths,
                # Explicit requirements: inferring them costs ~10 s (shared/NOTES).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"],
            )
    result: dict[str, Any] = {"weights_sha256": digest, "model_uri": info.model_uri, "version": None}
    if registered_model:
        result["version"] = _register(uri, info.model_uri, registered_model, version_tags, digest, alias)
    return result


def _register(uri: str, model_uri: str, name: str, tags: dict[str, Any], digest: str, alias: str) -> int:
    """A new version of `name` from a logged model (global URIs already set), tagged with its weights'
    digest, and the alias moved to it."""
    # register_model (not create_model_version) links the version to the logged model's id,
    # which a tracking server requires for a models:/m-... source.
    version = mlflow.register_model(
        model_uri, name, tags={**{k: str(v) for k, v in tags.items()}, "weights_sha256": digest}
    )
    if alias:
        client_for(uri).set_registered_model_alias(name, alias, str(version.version))
    return int(version.version)


def register_run_model(
    uri: str, run_id: str, *, registered_model: str, alias: str = "", tags: dict[str, Any] | None = None
) -> int:
    """Register the model a run logged (`runs:/ID/model`) as a new version, with the run's weights digest."""
    digest = client_for(uri).get_run(run_id).data.tags.get("advtrain.weights_sha256", "")
    with _global_uris(uri):
        return _register(uri, f"runs:/{run_id}/model", registered_model, tags or {}, digest, alias)


@dataclass(frozen=True)
class ResolvedModel:
    """A loaded model and where it came from (registry coordinates when it has them)."""

    model: nn.Module
    weights_sha256: str
    architecture: dict[str, Any]
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def code(self) -> Path | None:
        """A user model's package folder or module file as imported here (to ship to Ray tasks); None for a
        built-in."""
        return code_location(self.architecture["name"]) if is_import_path(self.architecture["name"]) else None


def resolve_model(model_uri: str, *, tracking_uri: str | None = None) -> ResolvedModel:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model` or a local folder -> the model.

    Eval mode, CPU; the weights' sha256 is checked against the registry's `weights_sha256` tag when the
    URI names a registered version (else against architecture.json: a local folder without a recorded
    digest is refused); never unpickles. A folder holds architecture.json and model.safetensors, or
    MLflow's layout of them under artifacts/; nothing deeper is searched.
    """
    if not model_uri.startswith(("models:/", "runs:/")):
        # A folder (or a typo): answered without creating a tracking store or calling a server.
        model, digest, arch = load_folder(model_uri)
        return ResolvedModel(model, digest, arch)
    uri = resolve_tracking_uri(tracking_uri or "")
    client = client_for(uri)
    expected = name = version_number = run_id = None
    if model_uri.startswith("models:/"):
        name, version = _registered_version(client, model_uri)
        expected = version.tags.get("weights_sha256")
        if not expected:
            raise TrackingError(f"{model_uri}: version {version.version} has no weights_sha256 tag")
        version_number, run_id = str(version.version), version.run_id
        # The version's own artifact location: a models:/ URI would be resolved against the default
        # registry (MLFLOW_REGISTRY_URI / ./mlflow.db), not the tracking URI given here.
        source = client.get_model_version_download_uri(name, version.version)
    else:
        run_id, _, name_in_run = model_uri[len("runs:/") :].partition("/")
        # Both go into a filter string: one pattern, no quotes (an MLflow run id is 32 hex digits).
        checked_name(run_id, f"{model_uri}: the run id")
        checked_name(name_in_run or "model", f"{model_uri}: the model name")
        source = _logged_model_location(client, run_id, name_in_run or "model", model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        except MlflowException as err:
            raise TrackingError(f"{model_uri}: cannot download the model ({err.message})") from None
        model, digest, arch = load_folder(local, expected_sha256=expected)
    return ResolvedModel(model, digest, arch, name, version_number, run_id, uri)


def _logged_model_location(client: MlflowClient, run_id: str, name: str, model_uri: str) -> str:
    """MLflow 3 stores a logged model apart from the run's artifacts: find it by run and name."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"{model_uri}: no MLflow run with id '{run_id}'") from None
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    if not models:
        return model_uri  # an older run that logged the model as plain run artifacts
    return models[-1].artifact_location


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The nn.Module behind a model URI (see `resolve_model`), in eval mode, weights verified."""
    return resolve_model(model_uri, tracking_uri=tracking_uri).model


def _registered_version(client: MlflowClient, model_uri: str):
    ref = model_uri[len("models:/") :]
    checked_name(re.split(r"[@/]", ref, maxsplit=1)[0], f"{model_uri}: the registered model")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return name, client.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = _aliases(client, name)
            raise TrackingError(
                f"{model_uri}: registered model '{name}' has no alias '{alias}' (aliases: {aliases or 'none'})"
            ) from None
    name, _, version = ref.partition("/")
    if not VERSION_NUMBER.fullmatch(version):
        raise TrackingError(f"{model_uri}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS")
    try:
        return name, client.get_model_version(name, version)
    except MlflowException:
        raise TrackingError(f"{model_uri}: no version {version} of registered model '{name}'") from None


def _aliases(client: MlflowClient, name: str) -> list[str]:
    try:
        return sorted(client.get_registered_model(name).aliases)
    except MlflowException:
        raise TrackingError(f"no registered model named '{name}'") from None


def stored_weights_sha256(uri: str, name: str, version: str) -> str:
    """sha256 of a registered version's weights as stored in the artifact store now (downloaded, so a
    file changed after evaluation is caught; tags are not trusted for this)."""
    client = client_for(uri)
    source = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
        except MlflowException as err:
            raise TrackingError(f"{name}/{version}: cannot download the stored model ({err.message})") from None
        try:
            weights = model_files(local)[1]
        except ModelError as err:
            raise TrackingError(f"{name}/{version}: the stored model is incomplete: {err}") from None
        return sha256_file(weights)
