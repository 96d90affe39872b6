"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard 2016, "DeepFool: a simple and accurate method to fool deep
neural networks", arXiv:1511.04599), multi-class, L2 and Linf (the paper's Algorithm 2 with q = 2 and q = 1).

Each iteration linearises the classifier at the current point and steps to the nearest linearised
boundary among the candidate classes: with f'_k = z_k - z_y and w'_k = grad f'_k, the class
l = argmin_k |f'_k| / ||w'_k||_q (q the dual norm: 2 for L2, 1 for Linf) and the step
r = (|f'_l| + 1e-4) / ||w'_l||_q^q * |w'_l|^(q-1) sign(w'_l). The steps add up to r_tot and the iterate
is x + (1 + overshoot) r_tot, clipped to the image box, until the prediction changes.

Defaults are the paper's: overshoot 0.02, at most 50 iterations, the 10 most likely classes (by the clean
logits; the true class and 9 others) as candidates. Popular libraries differ: IBM ART's `DeepFool` uses
`epsilon=1e-6` as its overshoot and 100 iterations; foolbox 3's follow the paper (0.02, 50, 10).

Batched: the examples not yet fooled move at once (a fooled one leaves the batch). One candidate's
gradient for the batch is one autograd.grad of the summed differences (examples are independent with
the model in eval mode), so an iteration costs 1 forward and num_candidates - 1 backward passes over the
examples still moving (foolbox 3 runs a forward pass per candidate and keeps fooled examples in the batch).

DeepFool finds a small, not the smallest, perturbation. With eps=inf it returns the final iterate
(adversarial where the prediction changed within num_steps); with a finite eps, the projection of that
iterate onto the eps-ball, which is how it serves as a training attack ("an efficient alternative for
generating training examples").
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.minimal import check_norm, within_eps
from pipeline.attacks.pgd import Norm


def _candidate_differences(
    model: nn.Module, point: torch.Tensor, y: torch.Tensor, others: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At `point`: f'_k = z_k - z_y (N, K) and w'_k = its input gradient (N, K, *shape) for the K classes in
    `others` (N, K), and the prediction (N,)."""
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(point).float()
        differences = logits.gather(1, others) - logits.gather(1, y[:, None])
        grads = [
            torch.autograd.grad(differences[:, k].sum(), point, retain_graph=k + 1 < others.shape[1])[0]
            for k in range(others.shape[1])
        ]
    return differences.detach(), torch.stack(grads, 1).detach(), logits.argmax(1).detach()


def _step_to_boundary(differences: torch.Tensor, grads: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The per-example step r to the nearest linearised boundary (the paper's eqs. 8-9, and 11 for q=1)."""
    flat = grads.flatten(2)
    dual = flat.norm(p=2, dim=2) if norm == "l2" else flat.abs().sum(2)
    distance = differences.abs() / (dual + 1e-12)
    nearest = distance.argmin(1)
    pick = nearest[:, None]
    w = flat.gather(1, pick[:, :, None].expand(-1, 1, flat.shape[2])).squeeze(1)
    f = differences.gather(1, pick).squeeze(1)
    w_dual = dual.gather(1, pick).squeeze(1)
    if norm == "l2":
        step = ((f.abs() + 1e-4) / (w_dual**2 + 1e-12))[:, None] * w
    else:
        step = ((f.abs() + 1e-4) / (w_dual + 1e-12))[:, None] * w.sign()
    return step.view(grads.shape[0], *grads.shape[2:])


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "l2",
    generator: torch.Generator | None = None,
    num_steps: int = 50,
    overshoot: float = 0.02,
    num_candidates: int = 10,
) -> torch.Tensor:
    """DeepFool (see the module docstring). x (N,C,H,W) in [0,1], y (N,) the labels to move away from.
    `generator` is taken for the shared signature (DeepFool is deterministic). Returns detached x_adv in
    [0,1] (in the eps-ball for a finite eps); the model's mode is left as it is."""
    check_norm("deepfool", norm)
    if num_steps < 1 or overshoot < 0 or num_candidates < 2:
        raise ValueError(
            f"deepfool needs num_steps >= 1, overshoot >= 0 and num_candidates >= 2 (the true class and at least "
            f"one other); got num_steps={num_steps}, overshoot={overshoot}, num_candidates={num_candidates}"
        )
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    with torch.no_grad():
        clean_logits = model(x).float()
    k = min(num_candidates, clean_logits.shape[1])
    ranked = clean_logits.masked_fill(torch.nn.functional.one_hot(y, clean_logits.shape[1]).bool(), float("-inf"))
    others = ranked.topk(k - 1, dim=1).indices  # the k-1 most likely classes other than y
    r_total = torch.zeros_like(x)
    x_adv = x.detach().clone()
    active = torch.arange(x.shape[0], device=x.device)  # still classified as y: the only ones that move
    for _ in range(num_steps):
        differences, grads, predicted = _candidate_differences(model, x_adv[active], y[active], others[active])
        still = predicted == y[active]
        # One sync per iteration: stopping early, and computing only on the examples not yet fooled (a
        # fooled example's gradients would be thrown away), is most of DeepFool's speed.
        if not bool(still.any()):
            break
        active, differences, grads = active[still], differences[still], grads[still]
        r_total[active] += _step_to_boundary(differences, grads, norm)
        x_adv[active] = (x[active] + (1 + overshoot) * r_total[active]).clamp(0, 1)
    return within_eps(x, x_adv, eps=eps, norm=norm)
