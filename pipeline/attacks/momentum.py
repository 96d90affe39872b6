"""MI-FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum", arXiv:1710.06081): iterative
FGSM with a momentum term that accumulates L1-normalised gradients, which makes examples crafted on one
model transfer better to another (the paper's black-box setting). Used by `advtrain evaluate
--transfer-from` beside PGD.

g_{t+1} = mu g_t + grad_t / ||grad_t||_1; Linf: x_{t+1} = clip(x_t + alpha sign(g_{t+1})), L2:
x_{t+1} = clip(x_t + alpha g_{t+1} / ||g_{t+1}||_2), projected onto the eps-ball and [0,1].
Defaults are the paper's: 10 iterations, alpha = eps / num_steps, decay mu = 1.0, no random start.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.losses import cross_entropy
from pipeline.attacks.pgd import Norm, _per_example_norm, _project, per_example_view


def mi_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "linf",
    generator: torch.Generator | None = None,
    num_steps: int = 10,
    decay: float = 1.0,
) -> torch.Tensor:
    """MI-FGSM (see the module docstring). `generator` is taken for the shared signature (no randomness).
    Returns detached x_adv in the eps-ball and [0,1]; the model's mode is left as it is."""
    if num_steps < 1 or decay < 0 or eps < 0:
        raise ValueError(f"mi_fgsm needs eps >= 0, num_steps >= 1, decay >= 0; got {eps}, {num_steps}, {decay}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"mi_fgsm supports norm linf or l2, not {norm!r}")
    if eps == 0:
        return x.detach().clone()
    step_size = eps / num_steps
    delta = torch.zeros_like(x)
    momentum = torch.zeros_like(x)
    for _ in range(num_steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(cross_entropy(model(x + delta), y).sum(), delta)
        with torch.no_grad():
            l1 = per_example_view(grad.flatten(1).abs().sum(1).clamp_min(1e-12), x)
            momentum = decay * momentum + grad / l1
            step = momentum.sign() if norm == "linf" else momentum / _per_example_norm(momentum)
            delta = _project(delta.detach() + step_size * step, x, eps, norm)
    return (x + delta).detach()
