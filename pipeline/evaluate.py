"""Robust evaluation: worst case over an attack ensemble, sanity checks against gradient masking.

Pure torch (no ray, no mlflow): pipeline.orchestrate.evaluation shards `evaluate_chunk` over Ray workers and logs
the report (pipeline/evaluation_report.py). Like AutoAttack, each attack of the fixed-eps cascade runs only on
the points still robust. Randomness is seeded per chunk of examples, so results do not depend on how chunks
are sharded.

The reported robust accuracy is the worst case over everything the evaluation ran (`worst_case`): an
example broken by the cascade, by a minimal-norm attack within eps (`--protocol minimal`), by examples
transferred from a surrogate model (`--transfer-from`) or by a sanity check's stronger attacks counts as
broken. The sanity checks are pipeline/sanity.py.
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
from pipeline.attacks.minimal import perturbation_norms
from pipeline.models import input_memory_format

# AutoAttack's "standard" version (Croce & Hein 2020), each attack on the points still robust.
STANDARD = [
    ("apgd_ce", {"num_steps": 100}),
    ("apgd_t", {"num_steps": 100, "num_target_classes": 9}),
    ("fab_t", {"num_steps": 100, "num_target_classes": 9}),
    ("square", {"num_queries": 5000}),
]
# (attack name, keyword arguments): the fixed-eps cascade of each protocol. step_size for PGD is set from
# eps at run time. `minimal` runs the standard cascade too: its fixed-eps number is the one the
# minimal-norm curve is compared with.
PROTOCOLS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "fast": [("apgd_ce", {"num_steps": 50}), ("apgd_t", {"num_steps": 50, "num_target_classes": 3})],
    "standard": STANDARD,
    "pgd": [("pgd", {"num_steps": 50, "num_restarts": 2}), ("pgd_cw", {"num_steps": 50, "num_restarts": 1})],
    "minimal": STANDARD,
}
# A protocol that runs another's whole cascade (and more): its evidence stands in for the other's at promotion.
PROTOCOL_INCLUDES: dict[str, tuple[str, ...]] = {"minimal": ("standard",)}
# The minimal-norm attacks of `--protocol minimal`, run unbounded (eps=inf) on every clean-correct point:
# each example's smallest adversarial perturbation is the best of them. The papers' budgets, except C&W:
# 1000 iterations (with early abort) instead of 10000, so a CPU evaluation ends the same day.
MINIMAL_ATTACKS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "linf": [
        ("deepfool", {"num_steps": 50, "overshoot": 0.02}),
        ("fmn", {}),
        ("fab_t", {"num_steps": 100, "num_target_classes": 9}),
    ],
    "l2": [
        ("deepfool", {"num_steps": 50, "overshoot": 0.02}),
        ("fmn", {}),
        ("fab_t", {"num_steps": 100, "num_target_classes": 9}),
        ("cw_l2", {"num_steps": 1000}),
    ],
}
# `--transfer-from`: examples crafted on a surrogate model at the same eps, scored on the target.
TRANSFER_ATTACKS = [("pgd", {"num_steps": 50, "num_restarts": 1}), ("mi_fgsm", {"num_steps": 10, "decay": 1.0})]
NUM_GRID_EXAMPLES = 16


@dataclass
class ChunkResult:
    """Per-example outcome for examples [start, start + n)."""

    start: int
    clean_correct: torch.Tensor  # bool (n,)
    robust_after: dict[str, torch.Tensor]  # attack -> bool (n,), cumulative over the fixed-eps cascade
    predicted_adv: torch.Tensor  # int (n,) prediction on the final adversarial input
    grid_x_adv: torch.Tensor | None = None  # x_adv of examples with index < NUM_GRID_EXAMPLES
    seconds: dict[str, float] = field(default_factory=dict)
    # minimal-norm attack -> float (n,): the norm of the adversarial it found; inf: none found, 0: clean-wrong
    min_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    # transfer attack -> bool (n,): the target still correct on the surrogate's adversarial (False: clean-wrong)
    transfer_correct: dict[str, torch.Tensor] = field(default_factory=dict)
    # where it ran (`device_description`); a merged result lists each distinct one
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def robust(self) -> torch.Tensor:
        """bool (n,): robust to the whole fixed-eps cascade (the last attack's cumulative mask)."""
        return next(reversed(self.robust_after.values()))

    @property
    def min_norm(self) -> torch.Tensor | None:
        """float (n,): each example's smallest adversarial perturbation over the minimal-norm attacks."""
        return torch.stack(list(self.min_norms.values())).amin(0) if self.min_norms else None


def model_device(model: Callable, fallback: torch.device) -> torch.device:
    """Where the model's parameters live (`fallback` for a parameter-free model or a plain function)."""
    parameters = model.parameters() if isinstance(model, nn.Module) else iter(())
    first = next(parameters, None)
    return first.device if first is not None else fallback


def evaluation_numerics(*, deterministic: bool = False) -> None:
    """This process's numerics for evaluation: fp32 without TF32 (cuDNN and cuBLAS use TF32 on
    Ampere/Hopper by default, 10 mantissa bits: an attack's small steps then move less than they
    should); `deterministic`: deterministic kernels, no cuDNN autotuning (the same numbers run to run on
    one GPU, slower; cuBLAS also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def device_description(device: torch.device) -> dict[str, Any]:
    """Where an evaluation ran and with which numerics: recorded in the report beside the numbers."""
    described: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        described.update(
            name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}", cuda=torch.version.cuda
        )
    else:
        described.update(name="cpu", threads=torch.get_num_threads())
    return described


def survival_stages(
    result: ChunkResult, *, eps: float, extra_broken: torch.Tensor | None = None
) -> list[tuple[str, torch.Tensor]]:
    """(source, survived: bool (n,)) for everything the evaluation ran, in the order the report credits
    them: each cascade attack (cumulative), "minimal" (no minimal-norm adversarial within eps), each
    "transfer.<attack>", and "sanity" (`extra_broken`: the sanity checks' stronger attacks). The one list
    that `worst_case`, `per_example` and the report's counts all walk."""
    stages = list(result.robust_after.items())
    if result.min_norm is not None:
        stages.append(("minimal", result.min_norm > eps))
    stages += [(f"transfer.{name}", correct) for name, correct in result.transfer_correct.items()]
    if extra_broken is not None:
        stages.append(("sanity", ~extra_broken))
    return stages


def worst_case(result: ChunkResult, *, eps: float, extra_broken: torch.Tensor | None = None) -> torch.Tensor:
    """bool (n,): robust to everything the evaluation ran (every stage of `survival_stages`)."""
    robust = result.clean_correct.clone()
    for _, survived in survival_stages(result, eps=eps, extra_broken=extra_broken):
        robust &= survived
    return robust


def attack_kwargs(name: str, kwargs: dict[str, Any], *, eps: float, norm: str) -> dict[str, Any]:
    out = {"eps": eps, "norm": norm, **kwargs}
    if name in ("pgd", "pgd_cw"):
        out["step_size"] = 2.5 * eps / kwargs["num_steps"]
    return out


def _cascade(model: nn.Module, x, y, clean, *, attacks, eps: float, norm: str, generator) -> dict[str, Any]:
    """The fixed-eps attacks in order, each on the points still robust (AutoAttack's scheme)."""
    robust, x_final = clean.clone(), x.clone()
    robust_after, seconds, adv_pred_all = {}, {}, torch.full_like(y, -1)
    for name, kwargs in attacks:
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
            adv_pred_all[idx[fooled]] = adv_pred[fooled]
        robust_after[name] = robust.clone().cpu()
        seconds[name] = time.perf_counter() - started
    return {"robust_after": robust_after, "seconds": seconds, "x_final": x_final, "adv_pred": adv_pred_all}


def _minimal_norms(model: nn.Module, x, y, clean, *, norm: str, generator) -> tuple[dict, dict]:
    """Each minimal-norm attack, unbounded, on the clean-correct points: the norm of what it found."""
    norms, seconds = {}, {}
    idx = clean.nonzero().squeeze(1)
    for name, kwargs in MINIMAL_ATTACKS[norm]:
        started = time.perf_counter()
        found = torch.where(clean, math.inf, 0.0).to(device=x.device, dtype=torch.float32)
        if idx.numel():
            x_adv = get_attack(name)(model, x[idx], y[idx], eps=math.inf, norm=norm, generator=generator, **kwargs)
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y[idx]
            size = perturbation_norms(x[idx], x_adv, norm).float()
            found[idx] = torch.where(fooled, size, torch.full_like(size, math.inf))
        norms[name] = found.cpu()
        seconds[f"minimal.{name}"] = time.perf_counter() - started
    return norms, seconds


def _transferred(
    model: nn.Module, surrogate: nn.Module, x, y, clean, *, eps: float, norm: str, generator
) -> tuple[dict, dict]:
    """Adversarial examples crafted on `surrogate` (white-box there), scored on `model`."""
    correct, seconds = {}, {}
    for name, kwargs in TRANSFER_ATTACKS:
        started = time.perf_counter()
        x_adv = get_attack(name)(
            surrogate, x, y, generator=generator, **attack_kwargs(name, kwargs, eps=eps, norm=norm)
        )
        with torch.no_grad():
            correct[name] = (clean & (model(x_adv).argmax(1) == y)).cpu()
        seconds[f"transfer.{name}"] = time.perf_counter() - started
    return correct, seconds


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
    surrogate: nn.Module | None = None,
) -> ChunkResult:
    """Run the protocol's attacks on one chunk (model, and `surrogate` for transfer attacks, in eval mode
    on `device`; the caller sets both). Every tensor follows `device` (default: the model's)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; allowed: {', '.join(PROTOCOLS)}")
    device = device or model_device(model, x.device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
    x, y = x.to(device).contiguous(memory_format=input_memory_format(model)), y.to(device)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    clean = predicted == y
    out = _cascade(model, x, y, clean, attacks=PROTOCOLS[protocol], eps=eps, norm=norm, generator=generator)
    predicted = torch.where(out["adv_pred"] >= 0, out["adv_pred"], predicted)
    min_norms, transfer_correct, seconds = {}, {}, dict(out["seconds"])
    if protocol == "minimal":
        min_norms, spent = _minimal_norms(model, x, y, clean, norm=norm, generator=generator)
        seconds.update(spent)
    if surrogate is not None:
        transfer_correct, spent = _transferred(model, surrogate, x, y, clean, eps=eps, norm=norm, generator=generator)
        seconds.update(spent)
    grid = out["x_final"][: NUM_GRID_EXAMPLES - start].cpu() if start < NUM_GRID_EXAMPLES else None
    return ChunkResult(
        start,
        clean.cpu(),
        out["robust_after"],
        predicted.cpu(),
        grid,
        seconds,
        min_norms,
        transfer_correct,
        [device_description(device)],
    )


def merge(chunks: list[ChunkResult]) -> ChunkResult:
    """Chunks (any order) -> one result over all examples, in index order."""
    chunks = sorted(chunks, key=lambda c: c.start)
    grids = [c.grid_x_adv for c in chunks if c.grid_x_adv is not None]
    all_devices = [d for c in chunks for d in c.devices]
    seconds = {n: sum(c.seconds.get(n, 0.0) for c in chunks) for n in chunks[0].seconds}

    def joined(field_name: str) -> dict[str, torch.Tensor]:
        first = getattr(chunks[0], field_name)
        return {n: torch.cat([getattr(c, field_name)[n] for c in chunks]) for n in first}

    return ChunkResult(
        start=0,
        clean_correct=torch.cat([c.clean_correct for c in chunks]),
        robust_after=joined("robust_after"),
        predicted_adv=torch.cat([c.predicted_adv for c in chunks]),
        grid_x_adv=torch.cat(grids) if grids else None,
        seconds=seconds,
        min_norms=joined("min_norms"),
        transfer_correct=joined("transfer_correct"),
        devices=[d for i, d in enumerate(all_devices) if d not in all_devices[:i]],
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
    surrogate: nn.Module | None = None,
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
            surrogate=surrogate,
        )
        if on_chunk is not None:
            on_chunk(chunk)
        chunks.append(chunk)
    return merge(chunks)


def per_example(result: ChunkResult, *, eps: float, extra_broken: torch.Tensor | None = None) -> dict[str, list]:
    """Per example: clean-correct, robust (the worst case), the attack that broke it first (None = robust
    or wrong; "minimal.<attack>", "transfer.<attack>" or "sanity" after the cascade), the smallest
    adversarial perturbation found (`--protocol minimal`; None = none found)."""
    broken_by: list[str | None] = [None] * len(result.clean_correct)
    previous = result.clean_correct
    for name, survived in survival_stages(result, eps=eps, extra_broken=extra_broken):
        still = previous & survived
        for i in (previous & ~still).nonzero().squeeze(1).tolist():
            broken_by[i] = name
        previous = still
    rows = {"clean_correct": result.clean_correct.tolist(), "robust": previous.tolist(), "broken_by": broken_by}
    if result.min_norm is not None:
        rows["min_norm"] = [None if math.isinf(v) else v for v in result.min_norm.tolist()]
    return rows


def mcnemar_disagree(a: torch.Tensor, b: torch.Tensor, z: float = 1.96) -> bool:
    """Do two paired per-example outcomes (bool (n,)) differ by more than sampling noise? McNemar's test
    on the discordant pairs, which is what matters when both come from the same examples."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return only_a + only_b > 0 and abs(only_a - only_b) > z * math.sqrt(only_a + only_b)


def minimal_against_cascade(result: ChunkResult, *, eps: float) -> dict[str, Any] | None:
    """The two upper bounds of robust accuracy at eps compared example by example: the minimal-norm
    pass's (no adversarial within eps) and the fixed-eps cascade's. `minimal_stronger` / `minimal_looser`:
    one broke more than the other beyond sampling noise (McNemar). None without a minimal-norm pass."""
    if result.min_norm is None:
        return None
    survived_minimal, survived_cascade = result.min_norm > eps, result.robust
    only_minimal = int((survived_cascade & ~survived_minimal).sum())
    only_cascade = int((survived_minimal & ~survived_cascade).sum())
    significant = mcnemar_disagree(survived_minimal, survived_cascade)
    return {
        "accuracy_minimal_at_eps": float(survived_minimal.float().mean()),
        "accuracy_fixed_eps": float(survived_cascade.float().mean()),
        "only_minimal_broke": only_minimal,
        "only_fixed_eps_broke": only_cascade,
        "minimal_stronger": significant and only_minimal > only_cascade,
        "minimal_looser": significant and only_cascade > only_minimal,
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
