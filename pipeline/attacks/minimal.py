"""What the minimal-norm attacks (DeepFool, C&W, FAB, FMN) share: per-example perturbation norms, the
best-so-far bookkeeping, and the one rule that maps a minimal adversarial onto the Attack contract.

A minimal-norm attack searches for the smallest perturbation that changes the prediction. Called with
`eps=math.inf` it returns that perturbation unbounded (x itself where it found none: norm 0 and still
correct). With a finite eps it returns the projection of what it found onto the eps-ball and [0,1], so
every registered attack keeps the package contract (an adversarial within eps stays as it is).
"""

from __future__ import annotations

import math

import torch

from pipeline.attacks.pgd import Norm, _project, per_example_view


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm) -> torch.Tensor:
    """(N,) Linf or L2 norm of x_adv - x, in pixel space [0,1]."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(p=2, dim=1)


def within_eps(x: torch.Tensor, x_adv: torch.Tensor, *, eps: float, norm: Norm) -> torch.Tensor:
    """The attack's answer under the contract: x_adv itself for eps=inf, else projected onto the eps-ball."""
    if math.isinf(eps):
        return x_adv.detach().clamp(0, 1)
    return (x + _project((x_adv - x).detach(), x, eps, norm)).detach()


def keep_smaller(
    best: torch.Tensor,
    best_norm: torch.Tensor,
    candidate: torch.Tensor,
    candidate_norm: torch.Tensor,
    fooled: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, keep `candidate` where it fools the model with a smaller norm than the best so far
    (best_norm is inf where nothing was found yet). No host sync: a masked select on the device."""
    better = fooled & (candidate_norm < best_norm)
    mask = per_example_view(better, best)
    return torch.where(mask, candidate, best), torch.where(better, candidate_norm, best_norm)


def check_norm(name: str, norm: str, allowed: tuple[str, ...] = ("linf", "l2")) -> None:
    if norm not in allowed:
        raise ValueError(f"{name} supports norm {' or '.join(allowed)}, not {norm!r}")
