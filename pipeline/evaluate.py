"""Robust evaluation: worst case over an attack ensemble, sanity checks against gradient masking, reports.

Pure torch (no ray, no mlflow): pipeline.orchestrate.evaluation shards `evaluate_chunk` over Ray workers and logs
the report. Robust accuracy is the per-example worst case: an example counts as robust only if no
attack of the protocol fooled it; like AutoAttack, each attack runs only on the points still robust.
Randomness is seeded per chunk of examples, so results do not depend on how chunks are sharded.

The sanity checks that flag a number as a likely artefact of weak attacks or masked gradients are
pipeline/sanity.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.attacks import get_attack

# (attack name, keyword arguments). step_size for PGD is set from eps at run time.
PROTOCOLS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "fast": [("apgd_ce", {"num_steps": 50}), ("apgd_t", {"num_steps": 50, "num_target_classes": 3})],
    # AutoAttack's "standard" version (Croce & Hein 2020) without FAB-T.
    "standard": [
        ("apgd_ce", {"num_steps": 100}),
        ("apgd_t", {"num_steps": 100, "num_target_classes": 9}),
        ("square", {"num_queries": 5000}),
    ],
    "pgd": [("pgd", {"num_steps": 50, "num_restarts": 2}), ("pgd_cw", {"num_steps": 50, "num_restarts": 1})],
}
NUM_GRID_EXAMPLES = 16


@dataclass
class ChunkResult:
    """Per-example outcome for examples [start, start + n)."""

    start: int
    clean_correct: torch.Tensor  # bool (n,)
    robust_after: dict[str, torch.Tensor]  # attack -> bool (n,), cumulative over the protocol
    predicted_adv: torch.Tensor  # int (n,) prediction on the final adversarial input
    grid_x_adv: torch.Tensor | None = None  # x_adv of examples with index < NUM_GRID_EXAMPLES
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def robust(self) -> torch.Tensor:
        """bool (n,): robust to the whole protocol (the last attack's cumulative mask)."""
        return next(reversed(self.robust_after.values()))


def attack_kwargs(name: str, kwargs: dict[str, Any], *, eps: float, norm: str) -> dict[str, Any]:
    out = {"eps": eps, "norm": norm, **kwargs}
    if name in ("pgd", "pgd_cw"):
        out["step_size"] = 2.5 * eps / kwargs["num_steps"]
    return out


def evaluate_chunk(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    start: int,
    norm: str,
    eps: float,
    protocol: str,
    seed: int,
    device: torch.device | None = None,
) -> ChunkResult:
    """Run the protocol's attacks on one chunk (model in eval mode; the caller sets it)."""
    device = device or torch.device("cpu")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; allowed: {', '.join(PROTOCOLS)}")
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    clean = predicted == y
    robust = clean.clone()
    x_final = x.clone()
    robust_after, seconds = {}, {}
    for name, kwargs in PROTOCOLS[protocol]:
        started = time.perf_counter()
        idx = robust.nonzero().squeeze(1)
        if idx.numel():
            x_adv = get_attack(name)(
                model, x[idx], y[idx], generator=generator, **attack_kwargs(name, kwargs, eps=eps, norm=norm)
            )
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(1)
            fooled = adv_pred != y[idx]
            robust[idx[fooled]] = False
            x_final[idx[fooled]] = x_adv[fooled]
            predicted[idx[fooled]] = adv_pred[fooled]
        robust_after[name] = robust.clone().cpu()
        seconds[name] = time.perf_counter() - started
    grid = None
    if start < NUM_GRID_EXAMPLES:
        grid = x_final[: NUM_GRID_EXAMPLES - start].cpu()
    return ChunkResult(start, clean.cpu(), robust_after, predicted.cpu(), grid, seconds)


def merge(chunks: list[ChunkResult]) -> ChunkResult:
    """Chunks (any order) -> one result over all examples, in index order."""
    chunks = sorted(chunks, key=lambda c: c.start)
    names = list(chunks[0].robust_after)
    grids = [c.grid_x_adv for c in chunks if c.grid_x_adv is not None]
    seconds = {n: sum(c.seconds.get(n, 0.0) for c in chunks) for n in names}
    return ChunkResult(
        start=0,
        clean_correct=torch.cat([c.clean_correct for c in chunks]),
        robust_after={n: torch.cat([c.robust_after[n] for c in chunks]) for n in names},
        predicted_adv=torch.cat([c.predicted_adv for c in chunks]),
        grid_x_adv=torch.cat(grids) if grids else None,
        seconds=seconds,
    )


def evaluate_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    protocol: str,
    seed: int,
    chunk_size: int,
    on_chunk: Callable[[ChunkResult], None] | None = None,
) -> ChunkResult:
    """The whole evaluation in this process (what the Ray shards compute, chunk by chunk).

    `on_chunk` sees each chunk as it finishes: a strong ensemble on a CPU takes tens of minutes per
    thousand examples, and a caller wants to show progress.
    """
    chunks = []
    for s in range(0, len(y), chunk_size):
        chunk = evaluate_chunk(
            model,
            x[s : s + chunk_size],
            y[s : s + chunk_size],
            start=s,
            norm=norm,
            eps=eps,
            protocol=protocol,
            seed=seed,
        )
        if on_chunk is not None:
            on_chunk(chunk)
        chunks.append(chunk)
    return merge(chunks)


def per_example(result: ChunkResult) -> dict[str, list]:
    """Which examples were clean-correct, robust, and which attack broke each (None = robust or wrong)."""
    names = list(result.robust_after)
    broken_by: list[str | None] = [None] * len(result.clean_correct)
    previous = result.clean_correct
    for name in names:
        for i in (previous & ~result.robust_after[name]).nonzero().squeeze(1).tolist():
            broken_by[i] = name
        previous = result.robust_after[name]
    return {
        "clean_correct": result.clean_correct.tolist(),
        "robust": result.robust.tolist(),
        "broken_by": broken_by,
    }


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def report(
    result: ChunkResult,
    *,
    sanity: dict[str, Any] | None,
    protocol: str,
    norm: str,
    eps: float,
    seed: int,
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The JSON report: every number with the protocol that produced it."""
    import platform

    import torch as _torch

    n = len(result.clean_correct)
    names = [name for name, _ in PROTOCOLS[protocol]]
    robust = int(result.robust.sum())
    clean = int(result.clean_correct.sum())
    low, high = wilson_interval(robust, n)
    return {
        "model": model_info,
        "data": data_info,
        "threat_model": {"norm": norm, "eps": eps},
        "clean_accuracy": clean / n,
        "robust_accuracy": robust / n,
        "robust_accuracy_ci95": [low, high],
        "accuracy_after_each_attack": {name: float(result.robust_after[name].float().mean()) for name in names},
        "sanity": sanity,
        "suspect": (not sanity["passed"]) if sanity else None,
        "protocol": {
            "name": protocol,
            "attacks": [{"name": name, **kwargs} for name, kwargs in PROTOCOLS[protocol]],
            "worst_case": "per example over the attacks; each attack runs only on points still robust",
            "num_examples": n,
            "seed": seed,
        },
        "seconds": {"total": seconds, **{f"attack.{k}": v for k, v in result.seconds.items()}},
        "versions": {"torch": _torch.__version__, "python": platform.python_version(), "advtrain": _advtrain_version()},
    }


def _advtrain_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("advtrain")
    except PackageNotFoundError:
        return "unknown"


def plot_curve(sanity: dict[str, Any], path, *, norm: str, eps: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sanity["checks"]["monotone_in_eps"]["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["eps"] for p in curve], [p["accuracy"] for p in curve], marker="o")
    ax.axvline(eps, color="grey", linestyle="--", label=f"eval eps={eps}")
    ax.axhline(sanity["checks"]["monotone_in_eps"]["chance"], color="red", linestyle=":", label="chance")
    ax.set_xlabel(f"{norm} eps")
    ax.set_ylabel("accuracy (APGD-CE)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Robust accuracy vs eps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_examples(
    x: torch.Tensor, y: torch.Tensor, result: ChunkResult, class_names: list[str], path, *, count: int = 8
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.grid_x_adv is None:
        return
    count = min(count, len(result.grid_x_adv))
    fig, axes = plt.subplots(2, count, figsize=(1.4 * count, 3.2), squeeze=False)
    for i in range(count):
        for row, (image, label) in enumerate(
            [
                (x[i], f"true: {class_names[int(y[i])]}" + ("" if result.clean_correct[i] else " (missed)")),
                (result.grid_x_adv[i], f"adv: {class_names[int(result.predicted_adv[i])]}"),
            ]
        ):
            ax = axes[row][i]
            img = image.permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(label, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(model: str, rep: dict) -> str:
    """The report's headline numbers, each attack's and each sanity check's, and the verdict."""
    low, high = rep["robust_accuracy_ci95"]
    lines = [
        "",
        f"{model}: {rep['threat_model']['norm']} eps={rep['threat_model']['eps']}, protocol {rep['protocol']['name']}, "
        f"{rep['protocol']['num_examples']} examples, {rep['seconds']['total']:.0f}s",
        f"  clean accuracy   {rep['clean_accuracy']:.4f}",
        f"  robust accuracy  {rep['robust_accuracy']:.4f}  (95% CI {low:.4f}-{high:.4f})",
    ]
    lines += [f"    after {name:9s} {acc:.4f}" for name, acc in rep["accuracy_after_each_attack"].items()]
    if rep["sanity"]:
        for name, check in rep["sanity"]["checks"].items():
            lines.append(f"  sanity {name:26s} {'pass' if check['passed'] else 'FAIL'}")
        lines.append(
            f"  verdict          {'SUSPECT (a sanity check failed)' if rep['suspect'] else 'all sanity checks passed'}"
        )
    lines.append(f"  report           {rep['report_dir']}")
    return "\n".join(lines)
