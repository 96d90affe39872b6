"""Per-example attack losses (higher = more adversarial). Shapes: logits (N,K), y (N,) -> (N,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i != y} z_i - z_y: the Carlini & Wagner 2017 margin (positive = misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, arXiv:2003.01690, eq. 5), shift- and scale-invariant.

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi the logits sorted in decreasing order. With 2 classes
    (no z_pi3) the scale is z_pi1 - z_pi2 (AutoAttack refuses fewer than 3 classes; a user's binary task
    still gets evaluated).
    """
    logits = logits.float()
    sorted_logits, order = logits.sort(dim=1)
    top_is_true = (order[:, -1] == y).float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    best_other = sorted_logits[:, -2] * top_is_true + sorted_logits[:, -1] * (1.0 - top_is_true)
    third = sorted_logits[:, -min(3, logits.shape[1])]
    return -(true - best_other) / (sorted_logits[:, -1] - third + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 6): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). With fewer
    than 4 classes the missing z_pi3/z_pi4 are the lowest logit (AutoAttack refuses such tasks; the loss
    stays shift- and scale-invariant)."""
    logits = logits.float()
    sorted_logits, _ = logits.sort(dim=1)
    classes = logits.shape[1]
    true = logits.gather(1, y[:, None]).squeeze(1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    third, fourth = sorted_logits[:, -min(3, classes)], sorted_logits[:, -min(4, classes)]
    return -(true - tgt) / (sorted_logits[:, -1] - 0.5 * (third + fourth) + 1e-12)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: what Square attack minimises (negative = misclassified)."""
    return -cw_margin(logits, y)
