"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020, arXiv:1907.02044), Linf and L2, as AutoAttack's
"standard" version runs it (Croce & Hein 2020, arXiv:2003.01690).

A minimal-norm attack. For a target class t, each iteration linearises f = z_t - z_y at the iterate x_k
and projects both x_k and the original x_0 onto the hyperplane {z : f(x_k) + w.(z - x_k) = 0} (w the
input gradient of f), within the image box [0,1] (the exact box-constrained Linf / L2 projections of
the paper, found here by one sort and a cumulative sum per example). With d_k, d_0 those projection
steps, the next iterate is the convex combination
    x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x_0 + eta d_0)),
    alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max),
so the iterate is pulled toward the original more while it is close to the boundary; eta > 1 overshoots
the linearised boundary. Where x_{k+1} is misclassified, it is kept if it is the smallest adversarial
so far and then moved back toward the original, x_0 + beta (x_{k+1} - x_0). The answer is that best.

FAB-T as AutoAttack runs it: for each of the `num_target_classes` most likely other classes (by the
clean logits, most likely first), `num_restarts` runs of `num_steps` iterations on the points not yet
broken (with eps=inf, on every point: each keeps its smallest adversarial over all the targets). The
first run of a target starts at x itself; a restart starts at a random point at norm eps/2
around x (AutoAttack's FAB; with eps=inf, at half of AutoAttack's default FAB eps: 0.3 Linf, 1.0 L2).
Defaults are AutoAttack's "standard" FAB-T: 100 steps, 1 restart, 9 targets, alpha_max 0.1, eta 1.05,
beta 0.9; AutoAttack counts a point broken only when the norm of what FAB found is <= eps.

Where popular libraries differ: torchattacks' `FAB` (checked at commit 23620a6, Dec 2023) defaults to
steps=10, eps=8/255 and the untargeted version (targets only with multi_targeted=True, then
n_classes - 1 of them); its `AutoAttack(version="standard")` builds FAB with multi_targeted=True and
n_restarts=1 but keeps steps=10, not AutoAttack's 100. AutoAttack's own FAB seeds the global torch RNG
(torch.manual_seed); here randomness comes only from `generator`. The L1 version and the untargeted
FAB (AutoAttack's "plus" version, 5 restarts) are not provided.

The minimal-norm contract is pipeline/attacks/minimal.py: with eps=inf the smallest adversarial found (x
where none was found, and for points already misclassified); with a finite eps its projection onto the
eps-ball (the adversarial itself where it lies within eps).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.minimal import check_norm, keep_smaller, perturbation_norms, within_eps
from pipeline.attacks.pgd import Norm, per_example_view

# AutoAttack's FAB radius for random restarts when it is given no eps; used here when eps=inf.
UNBOUNDED_START_EPS: dict[str, float] = {"linf": 0.3, "l2": 1.0}


def _target_margin_and_grad(
    model: nn.Module, point: torch.Tensor, y: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f = z_target - z_y (N,) at `point` and its input gradient (N, *shape). One autograd.grad of the
    summed f: examples are independent with the model in eval mode, so row i is grad f_i."""
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(point)
        margin = (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)
        (grad,) = torch.autograd.grad(margin.sum(), point)
    return margin.detach(), grad.detach()


def _water_level(weights: torch.Tensor, caps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the level tau >= 0 with sum_i weights_i * min(tau, caps_i) = target (N,), or max_i caps_i
    where even tau = inf falls short. weights, caps >= 0 (N, D). The left side is piecewise linear and
    non-decreasing in tau with kinks at the caps: evaluate it at every cap in sorted order, count the
    kinks below the solution, and solve the linear piece that follows. No loop and no host sync."""
    caps_sorted, order = caps.sort(dim=1)
    weights_sorted = weights.gather(1, order)
    cum_weights = weights_sorted.cumsum(1)
    total = cum_weights[:, -1:]
    # Weight of the coordinates not yet capped once tau passes the k-th cap: the slope after kink k.
    slope_after = (total - cum_weights).clamp_min(0)
    value_at_kink = (weights_sorted * caps_sorted).cumsum(1) + caps_sorted * slope_after
    num_below = (value_at_kink < target[:, None]).sum(1, keepdim=True)
    zero = torch.zeros_like(total)
    start = torch.cat((zero, caps_sorted), 1).gather(1, num_below)
    value_at_start = torch.cat((zero, value_at_kink), 1).gather(1, num_below)
    slope = torch.cat((total, slope_after), 1).gather(1, num_below)
    rise = (target[:, None] - value_at_start) / slope.clamp_min(torch.finfo(slope.dtype).tiny)
    unreachable = num_below == caps.shape[1]
    return (start + torch.where(unreachable, torch.zeros_like(rise), rise)).clamp_min(0).squeeze(1)


def _project_onto_hyperplane(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The smallest step d (Linf or L2) with w.(points + d) = b and points + d in [0,1]; where the box
    makes the hyperplane unreachable, the step that gets closest (every useful coordinate at its bound).
    points, w (N, D) flattened, b (N,).

    Orient w so that w.points - b = c >= 0; the step must then lower w.z by c. Coordinate i can move
    against sign(w_i) by at most `room_i` (to 0 where w_i > 0, to 1 where w_i < 0). Linf: |d_i| =
    min(tau, room_i), lowering w.z by sum |w_i| min(tau, room_i). L2 (KKT): |d_i| = min(lambda |w_i|,
    room_i), lowering it by sum w_i^2 min(lambda, room_i / |w_i|). Either way a water level."""
    c = (w * points).sum(1) - b
    orientation = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w = w * orientation[:, None]
    c = c * orientation
    active = w != 0
    room = torch.where(w > 0, points, 1 - points).clamp_min(0)
    room = torch.where(active, room, torch.zeros_like(room))
    w_abs = w.abs()
    if norm == "linf":
        level = _water_level(w_abs, room, c)
        size = torch.minimum(level[:, None].expand_as(room), room)
    else:
        # Cap room / |w| at a large finite value: a near-zero gradient entry must not make inf * 0 = nan.
        caps = torch.where(active, room / w_abs.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(room))
        level = _water_level(w_abs**2, caps.clamp_max(1e12), c)
        size = torch.minimum(level[:, None] * w_abs, room)
    return -torch.sign(w) * size


def _random_start(x: torch.Tensor, radius: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """A point at norm `radius` from x in a random direction (AutoAttack's FAB restart), clipped to [0,1]."""
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        scale = t.flatten(1).abs().amax(1).clamp_min(torch.finfo(x.dtype).tiny)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        scale = t.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return (x + radius * t / per_example_view(scale, x)).clamp(0, 1)


def _fab_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    *,
    norm: Norm,
    num_steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB-T run toward `target` from `start`: (smallest adversarial seen, its norm), x and inf where
    none was seen. Every step is masked arithmetic on the whole batch: no host sync in the loop."""
    n = x.shape[0]
    x_flat = x.flatten(1)
    best, best_norm = x.clone(), torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
    x_k = start
    for _ in range(num_steps):
        margin, w = _target_margin_and_grad(model, x_k, y, target)
        with torch.no_grad():
            w = w.flatten(1)
            b = (w * x_k.flatten(1)).sum(1) - margin  # the linearised boundary: w.z = b
            # Project x_k and x_0 in one call: the same hyperplane, stacked along the batch.
            steps = _project_onto_hyperplane(torch.cat((x_k.flatten(1), x_flat)), w.repeat(2, 1), b.repeat(2), norm)
            step_k, step_0 = steps[:n], steps[n:]
            size = (steps.abs().amax(1) if norm == "linf" else steps.norm(dim=1)).clamp_min(1e-8)
            size_k, size_0 = size[:n], size[n:]
            alpha = (size_k / (size_k + size_0)).clamp(0, alpha_max)[:, None]
            moved = ((1 - alpha) * (x_k.flatten(1) + eta * step_k) + alpha * (x_flat + eta * step_0)).clamp(0, 1)
            x_k = moved.view_as(x)
            fooled = model(x_k).argmax(1) != y
            best, best_norm = keep_smaller(best, best_norm, x_k, perturbation_norms(x, x_k, norm), fooled)
            # Adversarial: step back toward the original to look for a smaller perturbation next.
            x_k = torch.where(per_example_view(fooled, x), x + beta * (x_k - x), x_k)
    return best, best_norm


def _check_options(num_steps: int, num_restarts: int, num_target_classes: int, eps: float) -> None:
    problems = []
    if num_steps < 1:
        problems.append(f"num_steps >= 1 (got {num_steps}; AutoAttack uses 100)")
    if num_restarts < 1:
        problems.append(f"num_restarts >= 1 (got {num_restarts}; AutoAttack's FAB-T uses 1)")
    if num_target_classes < 1:
        problems.append(f"num_target_classes >= 1 (got {num_target_classes}; AutoAttack uses 9)")
    if not eps >= 0:
        problems.append(f"eps >= 0 or math.inf for the unbounded minimal adversarial (got {eps})")
    if problems:
        raise ValueError("fab needs " + ", ".join(problems))


def fab(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "linf",
    generator: torch.Generator | None = None,
    num_steps: int = 100,
    num_restarts: int = 1,
    num_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> torch.Tensor:
    """FAB-T (see the module docstring). x (N,C,H,W) in [0,1], y (N,). Returns detached x_adv in [0,1]:
    the smallest adversarial found for eps=inf, its projection onto the eps-ball for a finite eps (x where
    none was found). `num_target_classes` is clamped to the number of classes - 1. Randomness (restarts
    only) comes from `generator`; the model's train/eval mode is left as it is."""
    check_norm("fab", norm)
    _check_options(num_steps, num_restarts, num_target_classes, eps)
    x = x.detach()
    if x.shape[0] == 0 or eps == 0:
        return x.clone()
    with torch.no_grad():
        logits = model(x)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
    targets = others.argsort(dim=1, descending=True)  # most likely other class first
    best = x.clone()
    # Already misclassified: the answer is x (norm 0), and they are never attacked.
    best_norm = torch.where(logits.argmax(1) == y, math.inf, 0.0).to(x.dtype)
    radius = (eps if math.isfinite(eps) else UNBOUNDED_START_EPS[norm]) / 2
    for k in range(min(num_target_classes, logits.shape[1] - 1)):
        for restart in range(num_restarts):
            # Still robust: nothing found yet, or (AutoAttack's rule) only beyond eps. With eps=inf (the
            # minimal-norm use) every target runs on every point and each keeps its smallest adversarial.
            still = best_norm > 0 if math.isinf(eps) else best_norm.isinf() | (best_norm > eps)
            idx = still.nonzero().squeeze(1)  # one host sync per run
            if idx.numel() == 0:
                return within_eps(x, best, eps=eps, norm=norm)
            x_sub = x[idx]
            start = x_sub if restart == 0 else _random_start(x_sub, radius, norm, generator)
            found, found_norm = _fab_run(
                model,
                x_sub,
                y[idx],
                targets[idx, k],
                start,
                norm=norm,
                num_steps=num_steps,
                alpha_max=alpha_max,
                eta=eta,
                beta=beta,
            )
            best[idx], best_norm[idx] = keep_smaller(
                best[idx], best_norm[idx], found, found_norm, found_norm.isfinite()
            )
    return within_eps(x, best, eps=eps, norm=norm)
