"""PGD and FGSM. The contract every attack keeps is in the package docstring (pipeline/attacks).

Attacks never call `loss.backward()`: under DDP that would all-reduce once per attack step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import nn

from pipeline.attacks.losses import cross_entropy, cw_margin

PER_EXAMPLE_LOSSES = {"ce": cross_entropy, "cw": cw_margin}

Norm = Literal["linf", "l2"]


class Attack(Protocol):
    """The one signature every attack shares: the model, clean x (N, C, H, W) in [0,1] and labels y (N,),
    then keyword-only eps, norm and generator, and the attack's own options (steps, restarts, queries...).
    There is no catch-all `**kwargs`: an option an attack does not take raises TypeError, so a misspelt
    keyword is never silently ignored. Returns detached x_adv in the eps-ball and [0,1]."""

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        norm: Norm = "linf",
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> torch.Tensor: ...


def per_example_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example tensor (N,) shaped (N, 1, 1, ...) to broadcast over `like` (N, C, H, W)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return per_example_view(t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12), t)


def _random_delta(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        delta = delta * eps
    else:
        # Uniform direction, radius uniform in [0, eps]: a cheap, common L2 start (Rony et al. 2019 style).
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_example_norm(direction)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        delta = direction * per_example_view(radius * eps, x)
    # Keep x + delta a valid image from the start.
    return (x + delta).clamp(0, 1) - x


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    delta = delta.clamp(-eps, eps) if norm == "linf" else delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
    # Clamping to the image box after the ball projection keeps both constraints for Linf exactly
    # and for L2 (the box clip can only shrink the norm).
    return (x + delta).clamp(0, 1) - x


def _pgd_once(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    num_steps: int,
    norm: Norm,
    random_start: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
) -> torch.Tensor:
    # Sum of per-example losses, not the mean: the step must not shrink with the batch size.
    delta = _random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    for _ in range(num_steps):
        delta.requires_grad_(True)
        # enable_grad: attacks work even when the caller evaluates under torch.no_grad().
        with torch.enable_grad():
            loss = loss_fn(model(x + delta), y).sum()
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            step = step_size * grad.sign() if norm == "linf" else step_size * grad / _per_example_norm(grad)
            delta = _project(delta.detach() + step, x, eps, norm)
    return (x + delta).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    num_steps: int,
    norm: Norm = "linf",
    random_start: bool = True,
    num_restarts: int = 1,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018, arXiv:1706.06083). (Its ~60 lines are the
    docstring and the restart bookkeeping; the iteration itself is `_pgd_once`.)

    `loss`: "ce" (cross-entropy), "cw" (the Carlini & Wagner margin, max_{i!=y} z_i - z_y, which does
    not saturate when the softmax does), or a per-example function (logits, y) -> (N,) to maximise.

    Linf: signed-gradient steps projected onto the box; L2: normalised-gradient steps projected onto
    the ball. With several restarts each example keeps its strongest iterate: one that is misclassified
    if any restart found one, else the one with the highest loss.
    """
    if eps < 0 or num_steps < 1 or num_restarts < 1 or step_size < 0:
        raise ValueError("pgd needs eps >= 0, step_size >= 0, num_steps >= 1, num_restarts >= 1")
    if eps == 0:
        return x.detach().clone()
    if callable(loss):
        loss_fn = loss
    elif loss in PER_EXAMPLE_LOSSES:
        loss_fn = PER_EXAMPLE_LOSSES[loss]
    else:
        raise ValueError(f"unknown PGD loss '{loss}'; allowed: {', '.join(PER_EXAMPLE_LOSSES)} or a function")
    best = None
    best_fooled = best_loss = None
    for _ in range(num_restarts):
        x_adv = _pgd_once(
            model,
            x,
            y,
            eps=eps,
            step_size=step_size,
            num_steps=num_steps,
            norm=norm,
            random_start=random_start,
            loss_fn=loss_fn,
            generator=generator,
        )
        if num_restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
            fooled = logits.argmax(1) != y
            value = loss_fn(logits, y)
        if best is None:
            best, best_fooled, best_loss = x_adv, fooled, value
            continue
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_loss))
        mask = per_example_view(better, x)
        best = torch.where(mask, x_adv, best)
        best_fooled = best_fooled | fooled
        best_loss = torch.where(better, value, best_loss)
    assert best is not None
    return best


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "linf",
    generator: torch.Generator | None = None,
    step_size: float | None = None,
    random_start: bool = False,
    num_steps: int = 1,
    num_restarts: int = 1,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, arXiv:1412.6572): one step of size eps.

    With `random_start=True` and `step_size=1.25*eps` this is FGSM-RS of Wong, Rice & Kolter 2020
    ("Fast is better than free", arXiv:2001.03994). `num_steps` and `num_restarts` are taken so that a
    training attack config calls fgsm and pgd alike; anything but 1 is refused, not ignored.
    """
    if num_steps != 1 or num_restarts != 1:
        raise ValueError(
            f"fgsm is a single step with no restarts (got num_steps={num_steps}, num_restarts={num_restarts}): "
            "set attack.num_steps = 1 and attack.num_restarts = 1, or use attack.name = 'pgd'"
        )
    return pgd(
        model,
        x,
        y,
        eps=eps,
        step_size=eps if step_size is None else step_size,
        num_steps=1,
        norm=norm,
        random_start=random_start,
        num_restarts=1,
        generator=generator,
    )
