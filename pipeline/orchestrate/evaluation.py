"""`advtrain evaluate`: robust evaluation sharded over Ray, its report, plots and MLflow evidence.

The examples are cut into fixed chunks; each chunk is a Ray task (so evaluation scales with the
cluster) seeded by its position, so the per-example results do not depend on the sharding. Results are
merged per example; sanity checks run on the merged result; the JSON report and plots are written to a
folder and, when the model comes from MLflow, logged to its run, with summary tags on the model version
(`eval.robust_acc`, `eval.protocol`, `eval.sanity`, `eval.weights_sha256`, ...) that promotion reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline import data as data_lib
from pipeline.card import write_card
from pipeline.errors import InputError
from pipeline.evaluate import PROTOCOLS, ChunkResult, evaluate_chunk, evaluation_numerics, merge, per_example
from pipeline.evaluation_report import plot_curve, plot_examples, plot_minimal_curve, report
from pipeline.models import build_model, is_import_path
from pipeline.models.user import pack_code, unpack_code
from pipeline.orchestrate.cluster import capacity, init_ray
from pipeline.orchestrate.model_setup import external_model
from pipeline.sanity import extra_broken, sanity_checks
from pipeline.tracking import model_store
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def _rebuild(
    arch: dict[str, Any], state: dict[str, torch.Tensor], code: dict | None, *, deterministic: bool = False
) -> torch.nn.Module:
    """The model in this task's process, in eval mode, on the GPU Ray gave the task (else the CPU)."""
    torch.set_num_threads(1)  # one task per CPU; same numerics on every worker
    evaluation_numerics(deterministic=deterministic)
    if code is not None:
        unpack_code(code)  # a user model's package, sent with the weights
    model = build_model(arch)
    model.load_state_dict(state)
    # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU: it is cuda:0 here.
    device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
    return model.to(device).eval()


@ray.remote(num_cpus=1)
def _chunk_task(model_ref, x, y, *, start, norm, eps, protocol, seed, surrogate_ref=None, deterministic=False):
    model = _rebuild(*model_ref, deterministic=deterministic)
    surrogate = _rebuild(*surrogate_ref, deterministic=deterministic) if surrogate_ref is not None else None
    return evaluate_chunk(
        model, x, y, start=start, norm=norm, eps=eps, protocol=protocol, seed=seed, surrogate=surrogate
    )


@ray.remote(num_cpus=1)
def _sanity_task(model_ref, x, y, *, deterministic=False, **kwargs) -> dict[str, Any]:
    return sanity_checks(_rebuild(*model_ref, deterministic=deterministic), x, y, **kwargs)


# A GPU task takes bigger chunks (a few large batches keep a GPU busy; 64 would leave it idle) and half a
# GPU, so two tasks overlap one's host work (launches, the cascade's bookkeeping) with the other's kernels.
CPU_CHUNK_SIZE, GPU_CHUNK_SIZE, GPUS_PER_TASK = 64, 500, 0.5


@dataclass(frozen=True)
class Placement:
    """Where the evaluation's tasks run: `device` "cpu" or "cuda", their chunk size and Ray options."""

    device: str
    chunk_size: int
    deterministic: bool

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_gpus": GPUS_PER_TASK} if self.device == "cuda" else {}
        if self.deterministic and self.device == "cuda":
            # cuBLAS reads it when CUDA starts in the task's process: a fresh worker with this environment.
            options["runtime_env"] = {"env_vars": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}}
        return options


def placement(device: str, *, chunk_size: int | None, deterministic: bool) -> Placement:
    """--device auto: GPU tasks when the connected cluster has (or its autoscaler can add) GPUs."""
    gpus = capacity().get("GPU", 0.0)
    if device == "cuda" and gpus <= 0:
        raise InputError("--device cuda: this Ray cluster has no GPU; use --device auto or cpu")
    chosen = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
    default = GPU_CHUNK_SIZE if chosen == "cuda" else CPU_CHUNK_SIZE
    return Placement(chosen, chunk_size or default, deterministic)


def check_evaluation_request(
    *,
    split: str,
    eps: float | None,
    num_examples: int,
    out_dir: str | Path | None,
    protocol: str = "standard",
    device: str = "auto",
    chunk_size: int | None = None,
) -> None:
    """Refuse an impossible request before anything is loaded or started (InputError naming the option)."""
    if device not in DEVICES:
        raise InputError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
        raise InputError("--device cuda: this machine has no CUDA device; use --device auto or cpu")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size {chunk_size}: examples per task, at least 1")
    if split not in data_lib.SPLITS:
        raise InputError(f"--split {split!r}: use one of {', '.join(data_lib.SPLITS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"--eps {eps!r}: a finite radius >= 0 in pixel space [0,1] (e.g. --eps 0.1)")
    if num_examples < 0:
        raise InputError(f"--num-examples {num_examples}: the first N examples of the split, N >= 0 (0 = all)")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir}: is a file; give a folder for the report (it is created if missing)")


def _threat_model(params: dict[str, str], norm: str | None, eps: float | None) -> tuple[str, float]:
    """The threat model to evaluate under: the one given, else the one the model was trained for."""
    norm = norm or params.get("attack.norm")
    if eps is None and "attack.eps" in params:
        try:
            eps = float(params["attack.eps"])
        except ValueError:
            eps = None
    if norm not in ("linf", "l2") or eps is None or not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"threat model unknown or invalid (norm={norm!r}, eps={eps!r}): pass --norm linf|l2 --eps E")
    if norm == "linf" and eps > 1:
        raise InputError(f"--eps {eps}: an Linf radius above 1 covers all of pixel space [0,1]; use eps <= 1")
    return norm, eps


def _resolved(
    model_uri: str, *, weights: str | None, overrides: list[str], data_path: str | None, tracking_uri: str | None
) -> model_store.ResolvedModel:
    """The model to evaluate: a model URI or folder, or a name + .safetensors weights (--weights)."""
    if weights is None:
        if is_import_path(model_uri):
            raise InputError(f"--model {model_uri}: a model function needs --weights FILE.safetensors and --data")
        if overrides:
            raise InputError("--set describes a model built from --weights; a registered model is used as stored")
        return model_store.resolve_model(model_uri, tracking_uri=tracking_uri)
    if not data_path:
        raise InputError(f"--model {model_uri} --weights {weights}: pass --data FOLDER (the images it classifies)")
    info = data_lib.read_metadata(data_path)
    model, arch = external_model(model_uri, weights, info, overrides=overrides, base=Path.cwd())
    return model_store.ResolvedModel(model, arch["weights_sha256"], arch)


def _evaluate_sharded(model_ref, x, y, *, where: Placement, progress: bool, **attack) -> ChunkResult:
    """Every chunk of examples as a Ray task, merged per example."""
    size, task = where.chunk_size, _chunk_task.options(**where.options())
    pending = [
        task.remote(model_ref, x[s : s + size], y[s : s + size], start=s, deterministic=where.deterministic, **attack)
        for s in range(0, len(y), size)
    ]
    return merge(_gather(pending, total=len(y), chunk_size=size, progress=progress))


def _write_report(rep: dict[str, Any], result: ChunkResult, sanity, x, y, info, out: Path, *, norm, eps) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    rows = per_example(result, eps=eps, extra_broken=extra_broken(sanity, len(y)))
    (out / "per_example.json").write_text(json.dumps(rows) + "\n")
    if sanity:
        plot_curve(sanity, out / "accuracy_vs_eps.png", norm=norm, eps=eps)
    if rep.get("minimal"):
        plot_minimal_curve(rep, out / "minimal_curve.png")
    plot_examples(x, y, result, list(info.class_names), out / "examples.png")
    rep["report_dir"] = str(out.resolve())


def _version_tags(resolved, rep: dict[str, Any], *, label: str, split: str, attack: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's summary as model version tags, which promotion reads (with the weights' sha256, so
    the evidence is bound to these weights). eval.robust_acc is the worst case; eval.sanity its verdict."""
    sanity = rep.get("sanity")
    optional = {
        "eval.min_norm_median": (rep.get("minimal") or {}).get("median_norm"),
        "eval.transfer_acc": (rep.get("transfer") or {}).get("accuracy"),
    }
    return {
        "eval.robust_acc": rep["robust_accuracy"],
        "eval.robust_acc_protocol": rep["robust_accuracy_protocol"],
        "eval.clean_acc": rep["clean_accuracy"],
        "eval.protocol": attack["protocol"],
        "eval.norm": attack["norm"],
        "eval.eps": attack["eps"],
        "eval.num_examples": rep["protocol"]["num_examples"],
        "eval.split": split,
        "eval.sanity": "skipped" if sanity is None else ("passed" if sanity["passed"] else "failed"),
        "eval.weights_sha256": resolved.weights_sha256,
        "eval.report": f"runs:/{resolved.run_id}/evaluation/{label}/report.json",
        **{key: value for key, value in optional.items() if value is not None},
    }


def _versions_for_card(resolved) -> list[dict[str, Any]] | None:
    """Clean vs robust of every version of the registered model (this one marked current)."""
    if not (resolved.name and resolved.version):
        return None
    from pipeline.tracking.registry import list_versions

    def number(value):
        return float(value) if value not in (None, "") else None

    verdicts = {"passed": "passed", "failed": "suspect", "skipped": "unchecked"}
    return [
        {
            "version": row["version"],
            "aliases": row["aliases"],
            "clean_acc": number(row["eval.clean_acc"] or row["test_clean_acc"]),
            "robust_acc": number(row["eval.robust_acc"]),
            "verdict": verdicts.get(row["eval.sanity"] or ""),
            "protocol": row["eval.protocol"],
            "eps": number(row["eval.eps"]),
            "current": row["version"] == str(resolved.version),
        }
        for row in list_versions(resolved.name, tracking_uri=resolved.tracking_uri)
    ]


def _log_evidence(resolved, rep: dict[str, Any], out: Path, *, label: str, split: str, attack: dict[str, Any]) -> None:
    """Tags on the model version, then the model card (it lists every version's tags), then the report
    folder as artifacts of the model's run."""
    if resolved.name and resolved.version:
        tags = _version_tags(resolved, rep, label=label, split=split, attack=attack)
        tracking.set_version_tags(resolved.tracking_uri, resolved.name, resolved.version, tags)
    write_card(out, rep, versions=_versions_for_card(resolved))
    if resolved.run_id:
        tracking.log_artifacts(resolved.tracking_uri, resolved.run_id, out, f"evaluation/{label}")


def _check_data_fits(data_path: str, info, architecture: dict[str, Any], *, what: str) -> None:
    if list(info.shape) != list(architecture["shape"]):
        raise InputError(f"{data_path}: images {info.shape} but {what} expects {architecture['shape']}")
    if info.num_classes != architecture["num_classes"]:
        raise InputError(
            f"{data_path}: {info.num_classes} classes but {what} predicts {architecture['num_classes']}; "
            "evaluate on the dataset it was trained for (--data)"
        )


def _model_ref(resolved: model_store.ResolvedModel):
    code = pack_code(resolved.code) if resolved.code is not None else None
    return ray.put((resolved.architecture, resolved.model.state_dict(), code))


def _surrogate(transfer_from: str | None, data_path: str, info, tracking_uri: str | None):
    """The surrogate model of `--transfer-from`, checked against the data before anything starts."""
    if transfer_from is None:
        return None
    surrogate = model_store.resolve_model(transfer_from, tracking_uri=tracking_uri)
    _check_data_fits(data_path, info, surrogate.architecture, what=f"the surrogate --transfer-from {transfer_from}")
    return surrogate


def _data_and_threat_model(model_uri: str, resolved, *, data_path: str | None, norm: str | None, eps: float | None):
    """The data (the one given, else the one the model was trained on), checked against the model, and the
    threat model: (data_path, info, norm, eps)."""
    params = tracking.run_params(resolved.tracking_uri, resolved.run_id) if resolved.run_id else {}
    data_path = data_path or params.get("data.path")
    if not data_path:
        raise InputError(f"{model_uri}: no data.path recorded with the model; pass --data FOLDER")
    norm, eps = _threat_model(params, norm, eps)
    info = data_lib.read_metadata(data_path)
    _check_data_fits(data_path, info, resolved.architecture, what="the model")
    return data_path, info, norm, eps


def _sanity(model_ref, x, y, result: ChunkResult, *, where: Placement, num_classes: int, attack: dict) -> dict:
    """The sanity checks as one Ray task, placed like the chunks."""
    task = _sanity_task.options(**where.options())
    return ray.get(
        task.remote(
            model_ref, x, y, num_classes=num_classes, result=result, deterministic=where.deterministic, **attack
        )
    )


def _model_info(model_uri: str, resolved) -> dict[str, Any]:
    return {
        "uri": model_uri,
        "name": resolved.name,
        "version": resolved.version,
        "run_id": resolved.run_id,
        "weights_sha256": resolved.weights_sha256,
        "architecture": resolved.architecture["name"],
    }


def run_evaluation(
    model_uri: str,
    *,
    data_path: str | None = None,
    split: str = "test",
    norm: str | None = None,
    eps: float | None = None,
    num_examples: int = 1000,
    protocol: str = "standard",
    seed: int = 0,
    chunk_size: int | None = None,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    run_sanity: bool | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    weights: str | None = None,
    overrides: list[str] | None = None,
    transfer_from: str | None = None,
    device: str = "auto",
    deterministic: bool = False,
) -> dict[str, Any]:
    """Evaluate on the Ray cluster at `ray_address` (else the connected one, RAY_ADDRESS or a local
    instance, started once the model and data are checked); returns the report (also in `out_dir`, with
    the model card `card.html`).

    `model_uri` is a model URI or folder, or, with `weights` (a .safetensors file), a built-in name or the
    user's package.module:function (`overrides`: model.* keys such as model.kwargs.depth=3) evaluated on
    `data_path`: a model advtrain never trained. `transfer_from`: a surrogate model URI whose PGD and
    MI-FGSM examples are scored on this model too (sanity runs for standard and minimal by default).
    `device`: auto (GPU tasks where the cluster has GPUs), cpu or cuda; `chunk_size`: examples per task
    (default 64 on CPUs, 500 on GPUs); `deterministic`: deterministic kernels (the report says which)."""
    started = time.perf_counter()
    request = {"split": split, "eps": eps, "num_examples": num_examples, "out_dir": out_dir, "protocol": protocol}
    check_evaluation_request(**request, device=device, chunk_size=chunk_size)
    resolved = _resolved(
        model_uri, weights=weights, overrides=overrides or [], data_path=data_path, tracking_uri=tracking_uri
    )
    data_path, info, norm, eps = _data_and_threat_model(model_uri, resolved, data_path=data_path, norm=norm, eps=eps)
    surrogate = _surrogate(transfer_from, data_path, info, tracking_uri or resolved.tracking_uri)
    x, y = data_lib.load_split(data_path, split, max_examples=num_examples)
    init_ray(ray_address)  # only now: every input above is checked without starting anything
    where = placement(device, chunk_size=chunk_size, deterministic=deterministic)

    model_ref = _model_ref(resolved)
    surrogate_ref = _model_ref(surrogate) if surrogate is not None else None
    attack = {"norm": norm, "eps": eps, "protocol": protocol, "seed": seed}
    result = _evaluate_sharded(model_ref, x, y, where=where, progress=progress, surrogate_ref=surrogate_ref, **attack)
    sanity = None
    if protocol in ("standard", "minimal") if run_sanity is None else run_sanity:
        sanity = _sanity(model_ref, x, y, result, where=where, num_classes=info.num_classes, attack=attack)
    rep = report(
        result,
        sanity=sanity,
        model_info=_model_info(model_uri, resolved),
        data_info={"path": str(data_path), "split": split, "source": info.source},
        seconds=time.perf_counter() - started,
        surrogate=transfer_from,
        **attack,
    )
    rep["device"] = described_devices(result.devices)
    rep["protocol"]["chunk_size"] = where.chunk_size  # the random starts are seeded per chunk
    label = f"{protocol}-{norm}-eps{eps:g}" + ("-transfer" if transfer_from else "")
    out = Path(out_dir or Path("reports") / f"{resolved.name or 'model'}-v{resolved.version or 'local'}-{label}")
    _write_report(rep, result, sanity, x, y, info, out, norm=norm, eps=eps)
    _log_evidence(resolved, rep, out, label=label, split=split, attack=attack)
    return rep


def described_devices(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's `device`: where the chunks ran (one description, or the first with every name when
    tasks ran on different hardware; `type` "mixed" when on GPUs and CPUs)."""
    if not devices:
        return {"type": "unknown"}
    first = dict(devices[0])
    if len(devices) > 1:
        types = {d["type"] for d in devices}
        first["type"] = types.pop() if len(types) == 1 else "mixed"
        first["name"] = ", ".join(dict.fromkeys(str(d.get("name")) for d in devices))
        first["tf32"] = any(d.get("tf32") for d in devices)
        first["deterministic"] = all(d.get("deterministic") for d in devices)
    return first


def _gather(pending: list, *, total: int, chunk_size: int, progress: bool) -> list[ChunkResult]:
    from tqdm import tqdm

    chunks: list[ChunkResult] = []
    with tqdm(total=total, desc="evaluating", unit="ex", disable=not progress, file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            chunk = ray.get(done[0])
            chunks.append(chunk)
            bar.update(len(chunk.clean_correct))
    return chunks
