"""`advtrain models register`: a model advtrain did not train (a built-in or the user's
package.module:function, with .safetensors weights) registered as a version, so `advtrain evaluate` and
`advtrain promote` treat it like a trained one. Its MLflow run records the dataset and threat model the
evaluation defaults to; the version holds the weights, the architecture record and the user's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import data as data_lib
from pipeline.errors import InputError, checked_alias, checked_name
from pipeline.orchestrate.model_setup import external_model
from pipeline.tracking import model_store
from pipeline.tracking import runs as tracking

EXPERIMENT = "advtrain-registered"


def register_external_model(
    model: str,
    weights: str,
    *,
    data_path: str,
    registered_model: str,
    norm: str,
    eps: float,
    overrides: list[str] | None = None,
    alias: str = "",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Check everything (names, data, model, weights, server), then record one run and one new version;
    returns {"version", "weights_sha256", "run_id"}. A failure before the run leaves MLflow as it was."""
    checked_name(registered_model, "--name")
    if alias:
        checked_alias(alias, "--alias")
    if norm not in ("linf", "l2") or not (0 < eps <= (1 if norm == "linf" else 1e3)):
        raise InputError(
            f"--norm {norm} --eps {eps}: the threat model the model is meant for, e.g. --norm linf --eps 0.1"
        )
    base = Path.cwd()
    data_dir = Path(data_path) if Path(data_path).is_absolute() else (base / data_path).resolve()
    info = data_lib.read_metadata(data_dir)
    net, arch = external_model(model, weights, info, overrides=overrides or [], base=base)
    uri = tracking.resolve_tracking_uri(tracking_uri or "", cwd=base)
    tracking.client_for(uri)
    params = {
        "model.name": model,
        "model.weights": str(weights),
        "data.path": str(data_dir),
        "attack.norm": norm,
        "attack.eps": eps,
    }
    run_id, _ = tracking.start_or_resume_run(
        uri,
        experiment=EXPERIMENT,
        run_name=f"register-{registered_model}-{arch['weights_sha256'][:12]}",
        params=params,
        config_toml="".join(f"# {k} = {v}\n" for k, v in params.items()),
        tags={"advtrain.dataset": info.source, "advtrain.threat_model": f"{norm} eps={eps}"},
    )
    try:
        stored_arch = {k: v for k, v in arch.items() if k != "weights_sha256"}
        registered = model_store.log_and_register_model(
            uri,
            run_id,
            model=net,
            arch=stored_arch,
            registered_model=registered_model,
            alias=alias,
            version_tags={
                "dataset": info.source,
                "threat_model.norm": norm,
                "threat_model.eps": eps,
                "method": "external",
                "source_weights_sha256": arch["weights_sha256"],
            },
        )
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    tracking.set_tags(uri, run_id, {"advtrain.weights_sha256": registered["weights_sha256"]})
    tracking.end_run(uri, run_id, status="FINISHED")
    return {"version": registered["version"], "weights_sha256": registered["weights_sha256"], "run_id": run_id}
