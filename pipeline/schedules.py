"""Schedules as pure functions of training progress (epochs as a float, e.g. 2.5 = halfway into epoch 3).

These are the knobs a search tunes (epsilon ramp, attack steps, step size, learning rate); being pure,
each has exact expected values in tests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

EPS_RAMPS = ("none", "linear", "cosine", "piecewise")
LR_SCHEDULES = ("constant", "cosine", "onecycle", "piecewise")


def _interpolate(points: Sequence[Sequence[float]], x: float) -> float:
    """Piecewise-linear through (x, y) points sorted by x; constant beyond the ends."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def eps_at(
    progress: float,
    *,
    eps: float,
    ramp: str,
    ramp_epochs: float,
    milestones: Sequence[Sequence[float]] = (),
) -> float:
    """Training epsilon after `progress` epochs.

    `linear`: 0 -> eps over ramp_epochs; `cosine`: the same with a cosine shape (slow start and end);
    `piecewise`: linear between `milestones` [[epoch, fraction of eps], ...]. Ramping eps up avoids the
    early collapse of adversarial training on large radii (Gowal et al. 2018; common for MNIST-like data).
    """
    progress = max(0.0, progress)
    match ramp:
        case "none":
            return eps
        case "piecewise":
            if not milestones:
                raise ValueError("schedule.eps_ramp 'piecewise' needs schedule.eps_milestones [[epoch, fraction], ...]")
            return eps * _interpolate(milestones, progress)
        case "linear" | "cosine":
            if ramp_epochs <= 0:
                return eps
            t = min(1.0, progress / ramp_epochs)
            return eps * (t if ramp == "linear" else 0.5 * (1.0 - math.cos(math.pi * t)))
        case _:
            raise ValueError(f"unknown schedule.eps_ramp '{ramp}'; allowed: {', '.join(EPS_RAMPS)}")


def eps_by_step(
    epoch: int,
    *,
    steps_per_epoch: int,
    eps: float,
    ramp: str,
    ramp_epochs: float,
    milestones: Sequence[Sequence[float]] = (),
) -> Callable[[int], float]:
    """For epoch `epoch` (1-based): step index within the epoch -> training eps."""

    def eps_for_step(step: int) -> float:
        progress = epoch - 1 + step / max(steps_per_epoch, 1)
        return eps_at(progress, eps=eps, ramp=ramp, ramp_epochs=ramp_epochs, milestones=milestones)

    return eps_for_step


def attack_steps_at(epoch: int, *, start: int, final: int, ramp_epochs: float) -> int:
    """Attack steps in epoch `epoch` (1-based): `start` growing linearly to `final` over ramp_epochs
    (cheap early epochs, full-strength attacks later; start = 0 means always `final`)."""
    if start <= 0 or ramp_epochs <= 0:
        return final
    t = min(1.0, (epoch - 1) / ramp_epochs)
    return max(1, round(start + (final - start) * t))


def step_size(eps: float, *, num_steps: int, factor: float, absolute: float = 0.0) -> float:
    """`absolute` when > 0, else factor * eps / num_steps (Madry et al.: 2.5 * eps / steps;
    FGSM-RS: 1.25 * eps). Tied to eps, the step follows the eps ramp."""
    return absolute if absolute > 0 else factor * eps / num_steps


def lr_factor(
    progress: float,
    *,
    total_epochs: float,
    kind: str,
    milestones: Sequence[float] = (),
    decay: float = 0.1,
) -> float:
    """Multiplier of the base learning rate after `progress` epochs out of `total_epochs`.

    `piecewise`: multiply by `decay` at each milestone epoch (Madry et al.; Rice et al. 2020 decay 10x
    at 50% and 75% of training).
    """
    t = min(max(progress / total_epochs, 0.0), 1.0)
    match kind:
        case "constant":
            return 1.0
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        case "onecycle":
            # Linear up to the peak at 40% of training, then linearly down to 0 (Wong et al. 2020).
            return t / 0.4 if t < 0.4 else max(0.0, (1.0 - t) / 0.6)
        case "piecewise":
            return decay ** sum(1 for m in milestones if progress >= m)
        case _:
            raise ValueError(f"unknown optim.lr_schedule '{kind}'; allowed: {', '.join(LR_SCHEDULES)}")
