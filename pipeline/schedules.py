"""Schedules as pure functions of training progress (epochs as a float, e.g. 2.5 = halfway into epoch 3).

These are the knobs a search tunes; being pure, each has exact expected values in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def eps_at(progress: float, *, eps: float, ramp: str, ramp_epochs: float) -> float:
    """Training epsilon after `progress` epochs: `linear` grows from 0 to eps over ramp_epochs.

    Ramping eps up avoids the early collapse of adversarial training on large radii (Gowal et al.
    2018 IBP; commonly used for PGD-AT on MNIST-like data).
    """
    if ramp == "none" or ramp_epochs <= 0:
        return eps
    if ramp == "linear":
        return eps * min(1.0, max(0.0, progress) / ramp_epochs)
    raise ValueError(f"unknown schedule.eps_ramp '{ramp}'; allowed: none, linear")


def eps_by_step(
    epoch: int, *, steps_per_epoch: int, eps: float, ramp: str, ramp_epochs: float
) -> Callable[[int], float]:
    """For epoch `epoch` (1-based): step index within the epoch -> training eps."""

    def eps_for_step(step: int) -> float:
        return eps_at(epoch - 1 + step / max(steps_per_epoch, 1), eps=eps, ramp=ramp, ramp_epochs=ramp_epochs)

    return eps_for_step


def step_size(eps: float, *, num_steps: int, factor: float) -> float:
    """step_size = factor * eps / num_steps (Madry et al. use 2.5 * eps / steps; FGSM-RS 1.25 * eps)."""
    return factor * eps / num_steps


def lr_factor(progress: float, *, total_epochs: float, kind: str) -> float:
    """Multiplier of the base learning rate after `progress` epochs out of `total_epochs`."""
    t = min(max(progress / total_epochs, 0.0), 1.0)
    match kind:
        case "constant":
            return 1.0
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        case "onecycle":
            # Linear up to the peak at 40% of training, then linearly down to 0 (Wong et al. 2020).
            return t / 0.4 if t < 0.4 else max(0.0, (1.0 - t) / 0.6)
        case _:
            raise ValueError(f"unknown optim.lr_schedule '{kind}'; allowed: constant, cosine, onecycle")
