"""The evaluation's report: report.json (every number with the protocol that produced it and the sanity
verdict beside it), the text summary, and the plots. Pure torch + matplotlib (no ray, no mlflow)."""

from __future__ import annotations

import math
import platform
from typing import Any

import torch

from pipeline.evaluate import (
    MINIMAL_ATTACKS,
    PROTOCOLS,
    TRANSFER_ATTACKS,
    ChunkResult,
    minimal_against_cascade,
    survival_stages,
    wilson_interval,
    worst_case,
)
from pipeline.sanity import extra_broken


def verdict(sanity: dict[str, Any] | None) -> str:
    """ "passed", "suspect" (a sanity check failed) or "unchecked" (no sanity checks ran)."""
    if sanity is None:
        return "unchecked"
    return "passed" if sanity["passed"] else "suspect"


def _minimal_summary(result: ChunkResult, *, norm: str, eps: float) -> dict[str, Any] | None:
    """The smallest adversarial perturbation per example: median and mean, each attack's median, and the
    robust accuracy at every eps from that one pass (a step function: accuracy(e) = share of examples
    whose smallest perturbation is larger than e)."""
    best = result.min_norm
    if best is None:
        return None
    clean = result.clean_correct
    found = clean & torch.isfinite(best)
    sizes = best[clean]
    top = float(best[found].max()) if bool(found.any()) else 2 * eps
    grid = sorted({0.0, eps, *torch.linspace(0, max(top, 2 * eps) * 1.05, 41).tolist()})
    return {
        "norm": norm,
        "attacks": [{"name": name, **kwargs} for name, kwargs in MINIMAL_ATTACKS[norm]],
        # inf (none found) sorts last, so the median is a true median over the clean-correct examples
        # (None when more than half had no adversarial found: JSON has no infinity).
        "median_norm": _finite(sizes.median()) if sizes.numel() else None,
        "mean_norm": float(best[found].mean()) if bool(found.any()) else None,
        "not_found": int((clean & ~torch.isfinite(best)).sum()),
        "per_attack_median": {
            n: float(v[clean].median()) if bool(clean.any()) else None for n, v in result.min_norms.items()
        },
        "accuracy_at_eps": float((best > eps).float().mean()),
        "fixed_eps_accuracy": float(result.robust.float().mean()),
        # Both are upper bounds; a minimal pass significantly above the cascade is the looser one here.
        "looser_than_cascade": minimal_against_cascade(result, eps=eps)["minimal_looser"],
        "curve": [{"eps": e, "accuracy": float((best > e).float().mean())} for e in grid],
    }


def _finite(value: torch.Tensor) -> float | None:
    return float(value) if bool(torch.isfinite(value)) else None


def _transfer_summary(result: ChunkResult, surrogate: str | None) -> dict[str, Any] | None:
    if not result.transfer_correct:
        return None
    every = torch.stack(list(result.transfer_correct.values())).all(0)
    return {
        "surrogate": surrogate,
        "attacks": [{"name": name, **kwargs} for name, kwargs in TRANSFER_ATTACKS],
        "accuracy_after_each_attack": {n: float(v.float().mean()) for n, v in result.transfer_correct.items()},
        "accuracy": float(every.float().mean()),
    }


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
    surrogate: str | None = None,
) -> dict[str, Any]:
    """The JSON report. `robust_accuracy` is the worst case over everything this evaluation ran (cascade,
    minimal-norm attacks within eps, transferred examples, the sanity checks' attacks); the cascade's own
    number is `robust_accuracy_protocol`, and `broken_by_extra` says what the rest added."""
    n = len(result.clean_correct)
    broken_by_sanity = extra_broken(sanity, n)
    robust_mask = worst_case(result, eps=eps, extra_broken=broken_by_sanity)
    robust, clean = int(robust_mask.sum()), int(result.clean_correct.sum())
    low, high = wilson_interval(robust, n)
    return {
        "model": model_info,
        "data": data_info,
        "threat_model": {"norm": norm, "eps": eps},
        "clean_accuracy": clean / n,
        "robust_accuracy": robust / n,
        "robust_accuracy_ci95": [low, high],
        "verdict": verdict(sanity),
        "robust_accuracy_protocol": float(result.robust.float().mean()),
        "broken_by_extra": _extra_counts(result, eps=eps, broken_by_sanity=broken_by_sanity),
        "accuracy_after_each_attack": {n: float(after.float().mean()) for n, after in result.robust_after.items()},
        "minimal": _minimal_summary(result, norm=norm, eps=eps),
        "transfer": _transfer_summary(result, surrogate),
        "sanity": sanity,
        "suspect": (not sanity["passed"]) if sanity else None,
        "protocol": {
            "name": protocol,
            "attacks": [{"name": name, **kwargs} for name, kwargs in PROTOCOLS[protocol]],
            "worst_case": "per example over every attack run (cascade on points still robust, minimal-norm "
            "attacks within eps, transfer, sanity checks)",
            "num_examples": n,
            "seed": seed,
        },
        "seconds": {"total": seconds, **{f"attack.{k}": v for k, v in result.seconds.items()}},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "advtrain": _advtrain_version()},
    }


def _extra_counts(result: ChunkResult, *, eps: float, broken_by_sanity: torch.Tensor) -> dict[str, int]:
    """How many examples each source beyond the cascade broke that nothing before it had."""
    counts: dict[str, int] = {}
    robust = result.clean_correct.clone()
    for name, survived in survival_stages(result, eps=eps, extra_broken=broken_by_sanity):
        source = name.split(".")[0]  # every transfer attack counts as "transfer"
        if name not in result.robust_after:
            counts[source] = counts.get(source, 0) + int((robust & ~survived).sum())
        robust &= survived
    return counts


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


def plot_minimal_curve(rep: dict[str, Any], path) -> None:
    """The minimal-norm robust accuracy curve, with the fixed-eps cascade's number at the threat model's eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minimal, eps = rep["minimal"], rep["threat_model"]["eps"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step(
        [p["eps"] for p in minimal["curve"]],
        [p["accuracy"] for p in minimal["curve"]],
        where="post",
        label="smallest perturbation found",
    )
    ax.plot(
        [eps],
        [rep["robust_accuracy_protocol"]],
        marker="o",
        color="C3",
        linestyle="none",
        label=f"{rep['protocol']['name']} cascade at eps={eps:g}",
    )
    ax.axvline(eps, color="grey", linestyle="--")
    ax.set_xlabel(f"{minimal['norm']} eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Robust accuracy vs eps (minimal-norm attacks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _verdict_label(rep: dict[str, Any]) -> str:
    return {"passed": "sanity checks passed", "suspect": "SUSPECT", "unchecked": "sanity checks not run"}[
        rep["verdict"]
    ]


def summary_text(model: str, rep: dict) -> str:
    """The report's headline numbers (the robust one with its sanity verdict), each attack's and each
    sanity check's."""
    low, high = rep["robust_accuracy_ci95"]
    lines = [
        "",
        f"{model}: {rep['threat_model']['norm']} eps={rep['threat_model']['eps']}, protocol {rep['protocol']['name']}, "
        f"{rep['protocol']['num_examples']} examples, {rep['seconds']['total']:.0f}s",
        f"  clean accuracy   {rep['clean_accuracy']:.4f}",
        f"  robust accuracy  {rep['robust_accuracy']:.4f}  (95% CI {low:.4f}-{high:.4f}) [{_verdict_label(rep)}]",
        f"    cascade alone  {rep['robust_accuracy_protocol']:.4f}; also broken by "
        + ", ".join(f"{k} {v}" for k, v in rep["broken_by_extra"].items()),
    ]
    lines += [f"    after {name:9s} {acc:.4f}" for name, acc in rep["accuracy_after_each_attack"].items()]
    if rep.get("minimal"):
        m = rep["minimal"]
        median = "none found" if m["median_norm"] is None or math.isinf(m["median_norm"]) else f"{m['median_norm']:.4f}"
        lines.append(f"  minimal {m['norm']} norm  median {median}, robust at eps {m['accuracy_at_eps']:.4f}")
    if rep.get("transfer"):
        t = rep["transfer"]
        lines.append(f"  transfer from {t['surrogate']}: {t['accuracy']:.4f}")
    if rep["sanity"]:
        for name, check in rep["sanity"]["checks"].items():
            lines.append(f"  sanity {name:30s} {'pass' if check['passed'] else 'FAIL'}")
        lines.append(
            f"  verdict          {'SUSPECT (a sanity check failed)' if rep['suspect'] else 'all sanity checks passed'}"
        )
    lines.append(f"  report           {rep['report_dir']}")
    return "\n".join(lines)
