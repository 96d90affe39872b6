"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", arXiv:2003.01690): APGD-CE, APGD-DLR and targeted APGD-T.

Budget-aware step size: starts at 2*eps and is halved at checkpoints w_j (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when (1) fewer than rho = 75% of the steps since the
last checkpoint increased the loss, or (2) the step was not reduced at the last checkpoint and the best
loss has not improved since; the iterate then restarts from the best point. Momentum alpha = 0.75.

Same contract as every attack here: pixels in [0,1], x_adv in the eps-ball and the box, gradients w.r.t.
the input only, train/eval mode untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.attacks.losses import cross_entropy, dlr, dlr_targeted
from pipeline.attacks.pgd import per_example_view

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy, "dlr": dlr}


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _project(x_new: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.min(torch.max(x_new, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_new - x
    scale = torch.clamp(eps / (_l2(delta) + 1e-12), max=1.0)
    return (x + delta * per_example_view(scale, x)).clamp(0.0, 1.0)


def _checkpoints(num_steps: int) -> list[int]:
    """Iterations at which the step size is reconsidered (the paper's w_j = ceil(p_j * N_iter))."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # On the host in float32 (a host-side schedule, computed once; the rounding is the one we checked).
    return sorted({int(torch.tensor(v * num_steps, device="cpu").ceil()) for v in p if v <= 1.0} - {0})


def _apgd_once(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    num_steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rho: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One run; returns (x_fooling, fooled): for each example a misclassified iterate if one was seen.
    Long on purpose: Algorithm 1 of Croce & Hein 2020 as one loop, line by line beside the paper's."""
    n = x.shape[0]
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        x_adv = x + eps * t / per_example_view(t.flatten(1).abs().amax(1), x)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + eps * t / per_example_view(_l2(t) + 1e-12, x)
    x_adv = x_adv.clamp(0.0, 1.0)

    def loss_and_grad(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(point)
            per_example = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(per_example.sum(), point)
        return per_example.detach(), grad.detach(), logits.detach()

    loss, grad, logits = loss_and_grad(x_adv)
    fooled = logits.argmax(1) != y
    x_fooling = torch.where(per_example_view(fooled, x), x_adv, x)
    loss_best, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
    step = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_prev = x_adv.clone()
    checkpoints = _checkpoints(num_steps)
    last_checkpoint = 0
    increases = torch.zeros(n, device=x.device)
    reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
    loss_best_last = loss_best.clone()
    loss_prev = loss.clone()

    for i in range(num_steps):
        with torch.no_grad():
            momentum = 0.75 if i > 0 else 1.0
            if norm == "linf":
                z = _project(x_adv + per_example_view(step, x) * grad.sign(), x, eps, norm)
            else:
                z = _project(
                    x_adv + per_example_view(step, x) * grad / per_example_view(_l2(grad) + 1e-12, x), x, eps, norm
                )
            x_new = _project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm)
            x_prev, x_adv = x_adv, x_new
        loss, grad, logits = loss_and_grad(x_adv)
        with torch.no_grad():
            now_fooled = logits.argmax(1) != y
            x_fooling = torch.where(per_example_view(now_fooled & ~fooled, x), x_adv, x_fooling)
            fooled |= now_fooled
            increases += (loss > loss_prev).float()
            loss_prev = loss
            improved = loss > loss_best
            x_best = torch.where(per_example_view(improved, x), x_adv, x_best)
            grad_best = torch.where(per_example_view(improved, x), grad, grad_best)
            loss_best = torch.where(improved, loss, loss_best)
            if i + 1 in checkpoints:
                since = i + 1 - last_checkpoint
                oscillating = increases <= since * rho  # condition 1
                stalled = ~reduced_last & (loss_best_last >= loss_best)  # condition 2
                reduce = oscillating | stalled
                step = torch.where(reduce, step / 2.0, step)
                x_adv = torch.where(per_example_view(reduce, x), x_best, x_adv)
                grad = torch.where(per_example_view(reduce, x), grad_best, grad)
                reduced_last, loss_best_last = reduce, loss_best.clone()
                increases.zero_()
                last_checkpoint = i + 1
                if bool(fooled.all()):  # nothing left to change; one host sync per checkpoint, not per step
                    break
    return x_fooling.detach(), fooled


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    num_steps: int = 100,
    num_restarts: int = 1,
    loss: str = "ce",
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD with the cross-entropy (`loss="ce"`, APGD-CE) or DLR loss (`loss="dlr"`, APGD-DLR).

    Restarts run only on the examples no earlier restart has fooled. Returns x_adv: a misclassified
    point where one was found, else x itself (as AutoAttack reports).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown APGD loss '{loss}'; allowed: {', '.join(LOSSES)}")
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    x_adv = x.detach().clone()
    robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        robust &= model(x).argmax(1) == y
    for _ in range(num_restarts):
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        found, fooled = _apgd_once(
            model,
            x[idx],
            y[idx],
            eps=eps,
            norm=norm,
            num_steps=num_steps,
            loss_fn=LOSSES[loss],
            rho=rho,
            generator=generator,
        )
        x_adv[idx[fooled]] = found[fooled]
        robust[idx[fooled]] = False
    return x_adv


def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    num_steps: int = 100,
    num_target_classes: int = 9,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD-T: targeted DLR loss, one run per target among the top `num_target_classes` other classes
    (highest logits first), each only on examples still robust (Croce & Hein 2020, AutoAttack)."""
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    x_adv = x.detach().clone()
    with torch.no_grad():
        logits = model(x)
    robust = logits.argmax(1) == y
    order = logits.sort(dim=1)[1]  # ascending; order[:, -1] is the top class
    num_targets = min(num_target_classes, logits.shape[1] - 1)
    for k in range(2, num_targets + 2):
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        target = order[idx, -k]

        def loss_fn(out: torch.Tensor, labels: torch.Tensor, target: torch.Tensor = target) -> torch.Tensor:
            return dlr_targeted(out, labels, target)

        found, fooled = _apgd_once(
            model,
            x[idx],
            y[idx],
            eps=eps,
            norm=norm,
            num_steps=num_steps,
            loss_fn=loss_fn,
            rho=rho,
            generator=generator,
        )
        x_adv[idx[fooled]] = found[fooled]
        robust[idx[fooled]] = False
    return x_adv
