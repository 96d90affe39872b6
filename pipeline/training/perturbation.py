"""Adversarial weight perturbation (AWP, Wu, Xia & Wang 2020): the weights move along the method's own loss
gradient before the training step's backward and back before the optimizer step. Pure torch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import MethodConfig


def perturb_weights(
    network: nn.Module, loss_fn: Callable[[], torch.Tensor], *, gamma: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Adversarial weight perturbation (Wu, Xia & Wang 2020, arXiv:2004.05884, "Adversarial weight
    perturbation helps robust generalization"): move every conv / linear weight of `network` (the
    tensors with more than one dimension; biases and norm scales stay) by `gamma` times its own norm
    along the gradient of `loss_fn()`, the method's loss on its adversarial examples. Returns the
    (weight, saved copy) pairs that `restore_weights` copies back once the backward is done.

    One gradient-ascent step, normalised per layer, is what the paper's proxy model computes. The pass
    runs in train mode, as there; BatchNorm running statistics are put back so it leaves no trace.
    Call it inside the method's autocast region, like the rest of the method.
    """
    weights = [param for param in network.parameters() if param.requires_grad and param.dim() > 1]
    buffers = [buffer.clone() for buffer in network.buffers()]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    originals = []
    with torch.no_grad():
        for buffer, saved in zip(network.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        for weight, grad in zip(weights, grads, strict=True):
            if grad is None:
                continue
            grad = grad.float()
            # The unperturbed weight is kept, not the shift: (w + s) - s != w in floating point, and each
            # rank's s differs, so subtracting would let DDP replicas drift apart with nothing resyncing them.
            originals.append((weight, weight.detach().clone()))
            weight.add_(grad * (gamma * weight.norm() / (grad.norm() + 1e-20)))
    # Under autocast the bf16 copies of the weights are cached until the autocast region ends, and the
    # cache does not see in-place changes: without this the method's loss would be taken at the
    # unperturbed weights in bf16 (AWP silently off).
    torch.clear_autocast_cache()
    return originals


def restore_weights(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo `perturb_weights`. The training loop does it between the backward and the optimizer step, as SAM
    does (Foret et al. 2021): the gradient is the perturbed point's, the step (weight decay and momentum
    included) starts from the unperturbed weights. Wu et al. undo after the step; that differs by
    lr x weight_decay x shift, and under DDP, where each rank perturbs along its own shard's gradient,
    it would let the replicas drift apart by that much every step. The restore is a copy, exact to the
    bit, so identical replicas before the perturbation are identical after it."""
    if not saved:
        return
    with torch.no_grad():
        torch._foreach_copy_([weight for weight, _ in saved], [copy for _, copy in saved])


def weight_perturbation_gamma(method: MethodConfig, epoch: int) -> float:
    """`method.awp_gamma` from the epoch after `method.awp_warmup_epochs` on, 0 (no AWP) before it."""
    return method.awp_gamma if epoch > method.awp_warmup_epochs else 0.0
