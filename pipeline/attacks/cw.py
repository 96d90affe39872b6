"""Carlini & Wagner L2 (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural Networks",
arXiv:1608.04644): a minimal-norm attack (see pipeline/attacks/minimal.py for the eps contract).

Per example it minimises ||x_adv - x||_2^2 + c * max(Z_y - max_{i != y} Z_i + kappa, 0) over the
tanh-space variable w, x_adv = (tanh(w) + 1) / 2, so the box [0,1] holds without clipping. w starts at
the clean image, atanh((2x - 1) * (1 - 1e-6)) (the factor keeps atanh finite at 0 and 1), and Adam
(lr 0.01) is restarted, state and all, at every binary-search step. The constant c starts at
`initial_const`; after each search step it is multiplied by 10 while no adversarial has been found for
that example, else bisected between the largest failing and the smallest succeeding c. An example's
search step stops early when, at a check every num_steps // 10 steps, its loss has not gone below
0.9999 times its value at the previous check (the reference checks its batch's summed loss, with a
default batch of one example; here each example leaves the batch on its own). The smallest-L2
adversarial seen at any step of any search step is kept ("adversarial" means misclassified with a margin
of at least `confidence`). This is the reference code github.com/carlini/nn_robust_attacks l2_attack.py
(including its last-step retry at the upper bound when binary_search_steps >= 10), untargeted.

Defaults are the reference's: num_steps (MAX_ITERATIONS) 10000, learning_rate 0.01,
binary_search_steps 9, initial_const 1e-3, confidence 0, abort_early True. Libraries differ:
ART 1.20 `CarliniL2Method` defaults to max_iter=10, binary_search_steps=10, initial_const=0.01 and
replaces Adam with a line search (max_halving=5, max_doubling=5); torchattacks 3.5 `CW` has a fixed
c=1, steps=50, lr=0.01 and no binary search over c (its docstring says so).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.minimal import check_norm, keep_smaller, perturbation_norms, within_eps
from pipeline.attacks.pgd import Norm

# The reference's bounds: c above 1e9 means "no success yet" (keep multiplying by 10).
_NO_UPPER_BOUND = 1e10
_TANH_SHRINK = 1 - 1e-6
_ABORT_RATIO = 0.9999


def _hinge(logits: torch.Tensor, y: torch.Tensor, confidence: float) -> torch.Tensor:
    """(N,) max(Z_y - max_{i != y} Z_i + kappa, 0): zero once misclassified with margin kappa."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (true - other + confidence).clamp_min(0)


def _succeeds(logits: torch.Tensor, y: torch.Tensor, confidence: float) -> torch.Tensor:
    """(N,) bool: the prediction differs from y even after adding `confidence` to the true logit."""
    boost = confidence * nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (logits + boost).argmax(1) != y


def _adam_step(
    w: torch.Tensor, grad: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], step: int, learning_rate: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One Adam update (torch.optim.Adam's, betas 0.9/0.999, eps 1e-8), written out so that the moments
    can leave the batch with the examples that stop early."""
    first, second = moments
    first = 0.9 * first + 0.1 * grad
    second = 0.999 * second + 0.001 * grad * grad
    denom = (second.sqrt() / math.sqrt(1 - 0.999**step)).add_(1e-8)
    return w - (learning_rate / (1 - 0.9**step)) * first / denom, (first, second)


def _search_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    const: torch.Tensor,
    best: torch.Tensor,
    best_norm: torch.Tensor,
    *,
    num_steps: int,
    learning_rate: float,
    confidence: float,
    abort_early: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One binary-search step at constants `const` (N,): Adam on w from the clean image. Returns the
    updated (best, best_norm) and which examples succeeded at any iterate of this step.

    Early abort is per example, as in the reference at its default batch size of 1: an example whose
    loss stalled at a check leaves the batch (with its Adam moments), so the rest run on fewer."""
    active = torch.arange(x.shape[0], device=x.device)
    w = torch.atanh((2 * x - 1) * _TANH_SHRINK)
    moments = (torch.zeros_like(w), torch.zeros_like(w))
    succeeded = torch.zeros_like(y, dtype=torch.bool)
    check_every = max(num_steps // 10, 1)
    previous = torch.full_like(const, math.inf)
    # The examples still optimising, and their best so far (written back when they leave and at the end).
    xa, ya, ca, best_a, norm_a, succeeded_a = x, y, const, best.clone(), best_norm.clone(), succeeded.clone()
    for step in range(num_steps):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            x_adv = (torch.tanh(w) + 1) / 2
            logits = model(x_adv)
            loss = (x_adv - xa).flatten(1).pow(2).sum(1) + ca * _hinge(logits, ya, confidence)
            (grad,) = torch.autograd.grad(loss.sum(), w)
        with torch.no_grad():
            x_adv, loss = x_adv.detach(), loss.detach()
            fooled = _succeeds(logits.detach(), ya, confidence)
            succeeded_a |= fooled
            best_a, norm_a = keep_smaller(best_a, norm_a, x_adv, perturbation_norms(xa, x_adv, "l2"), fooled)
            if abort_early and step % check_every == 0:
                # The one host sync of the loop, once per check (as the reference checks its loss).
                keep = ~(loss > _ABORT_RATIO * previous)
                best[active], best_norm[active], succeeded[active] = best_a, norm_a, succeeded_a
                if not bool(keep.any()):
                    return best, best_norm, succeeded
                previous, active, xa, ya, ca = loss[keep], active[keep], xa[keep], ya[keep], ca[keep]
                best_a, norm_a, succeeded_a = best_a[keep], norm_a[keep], succeeded_a[keep]
                w, grad, moments = w[keep], grad[keep], (moments[0][keep], moments[1][keep])
            w, moments = _adam_step(w.detach(), grad, moments, step + 1, learning_rate)
    best[active], best_norm[active], succeeded[active] = best_a, norm_a, succeeded_a
    return best, best_norm, succeeded


def _next_const(
    const: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, succeeded: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's update: success lowers the upper bound, failure raises the lower one; bisect
    once an upper bound is known, else try 10 times the constant."""
    upper = torch.where(succeeded, torch.minimum(upper, const), upper)
    lower = torch.where(succeeded, lower, torch.maximum(lower, const))
    bounded = upper < 1e9
    const = torch.where(bounded, (lower + upper) / 2, torch.where(succeeded, const, const * 10))
    return const, lower, upper


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "l2",
    generator: torch.Generator | None = None,
    num_steps: int = 10000,
    binary_search_steps: int = 9,
    initial_const: float = 1e-3,
    learning_rate: float = 0.01,
    confidence: float = 0.0,
    abort_early: bool = True,
) -> torch.Tensor:
    """C&W L2 on x (N, C, H, W) in [0,1], labels y (N,). eps=math.inf: the smallest adversarial found
    per example (x where none was found or x is already misclassified); finite eps: that, projected
    onto the L2 eps-ball and [0,1]. Deterministic: `generator` is taken only for the shared signature.
    Gradients w.r.t. w only (autograd.grad); the model's mode and parameters are untouched."""
    check_norm("cw_l2", norm, allowed=("l2",))
    if not eps >= 0:
        raise ValueError(f"cw_l2 needs eps >= 0 (math.inf for the unbounded minimal adversarial), got {eps}")
    if num_steps < 1 or binary_search_steps < 1:
        raise ValueError(
            f"cw_l2 needs num_steps >= 1 and binary_search_steps >= 1, got {num_steps} and {binary_search_steps}"
        )
    if not (initial_const > 0 and learning_rate > 0 and confidence >= 0):
        raise ValueError(
            "cw_l2 needs initial_const > 0, learning_rate > 0 and confidence >= 0, got "
            f"{initial_const}, {learning_rate} and {confidence}"
        )
    x = x.detach()
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    with torch.no_grad():
        already = model(x).argmax(1) != y
    # Misclassified points keep x itself (norm 0), which nothing can beat.
    best = x.clone()
    best_norm = torch.where(already, 0.0, math.inf).to(x.dtype)
    const = torch.full(y.shape, initial_const, device=x.device, dtype=x.dtype)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, _NO_UPPER_BOUND)
    for search_step in range(binary_search_steps):
        if binary_search_steps >= 10 and search_step == binary_search_steps - 1:
            const = upper  # the reference's last try: the smallest constant known to succeed
        best, best_norm, succeeded = _search_step(
            model,
            x,
            y,
            const,
            best,
            best_norm,
            num_steps=num_steps,
            learning_rate=learning_rate,
            confidence=confidence,
            abort_early=abort_early,
        )
        const, lower, upper = _next_const(const, lower, upper, succeeded)
    return within_eps(x, best, eps=eps, norm="l2")
