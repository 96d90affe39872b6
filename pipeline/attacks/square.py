"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, arXiv:1912.00049): score-based,
black-box, Linf and L2.

Random search: each query changes one square window (side s set by the schedule on p, the fraction of
pixels changed, which halves at fixed points of the query budget) and keeps the change if the margin
loss z_y - max_{i!=y} z_i went down. Linf windows get +-eps per channel (vertical-stripe init); L2
windows get the paper's "meta pseudo-gaussian" pattern, with the budget moved from a second window.
Uses only the model's outputs, never gradients: stronger than the white-box attacks only when gradients
are masked (AutoAttack's sanity check).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.losses import margin_loss


def p_selection(p_init: float, query: int, num_queries: int, *, rescale: bool = True) -> float:
    """The paper's piecewise-constant schedule, defined for 10,000 queries; `rescale` stretches it to the
    budget (the Square paper's code), else p follows the raw query index (AutoAttack's resc_schedule=False)."""
    it = int(query / num_queries * 10000) if rescale else query
    for bound, divisor in (
        (8000, 512),
        (6000, 256),
        (4000, 128),
        (2000, 64),
        (1000, 32),
        (500, 16),
        (200, 8),
        (50, 4),
        (10, 2),
    ):
        if it > bound:
            return p_init / divisor
    return p_init


def _random_sign(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


def _randint(high: int, generator: torch.Generator | None, device: torch.device) -> int:
    return int(torch.randint(0, max(high, 1), (1,), generator=generator, device=device))


def _eta_rectangles(h: int, w: int, device: torch.device) -> torch.Tensor:
    delta = torch.zeros(h, w, device=device)
    ch, cw = h // 2 + 1, w // 2 + 1
    top, left = ch - 1, cw - 1
    for counter in range(max(ch, cw)):
        delta[max(top, 0) : min(top + 2 * counter + 1, h), max(left, 0) : min(left + 2 * counter + 1, w)] += (
            1.0 / (counter + 1) ** 2
        )
        top, left = top - 1, left - 1
    return delta / delta.pow(2).sum().sqrt()


def _meta_pseudo_gaussian(s: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    delta = torch.zeros(s, s, device=device)
    delta[: s // 2] = _eta_rectangles(s // 2, s, device)
    delta[s // 2 :] = -_eta_rectangles(s - s // 2, s, device)
    delta = delta / delta.pow(2).sum().sqrt()
    if float(torch.rand(1, generator=generator, device=device)) > 0.5:
        delta = delta.t()
    return delta


def _l2_norm(t: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    num_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted Square attack; x (N,C,H,W) in [0,1]. Queries stop per example once it is fooled.

    `rescale_schedule=False` is AutoAttack's setting (its SquareAttack(resc_schedule=False)): with 5000
    queries p halves at queries 10, 50, 200, 500, 1000, 2000, 4000 and ends at p_init/128; True stretches
    the 10,000-query schedule over the budget (p_init/512 from 80% of it on, 1-pixel windows on 28x28).
    """
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    device = x.device
    n, c, h, w = x.shape
    with torch.no_grad():
        if norm == "linf":
            x_best = (x + eps * _random_sign((n, c, 1, w), generator, device)).clamp(0, 1)
        else:
            x_best = _l2_init(x, eps, generator)
        margin = margin_loss(model(x_best), y)
        for query in range(1, num_queries):
            active = (margin > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            x_cur, x_best_cur, y_cur = x[active], x_best[active], y[active]
            p = p_selection(p_init, query, num_queries, rescale=rescale_schedule)
            if norm == "linf":
                s = min(max(round(math.sqrt(p * h * w)), 1), h - 1)
                vh, vw = _randint(h - s, generator, device), _randint(w - s, generator, device)
                x_new = x_best_cur.clone()
                signs = eps * _random_sign((len(active), c, 1, 1), generator, device)
                x_new[:, :, vh : vh + s, vw : vw + s] = x_cur[:, :, vh : vh + s, vw : vw + s] + signs
                x_new = torch.min(torch.max(x_new, x_cur - eps), x_cur + eps).clamp(0, 1)
            else:
                x_new = _l2_step(x_cur, x_best_cur, eps, p, generator)
            new_margin = margin_loss(model(x_new), y_cur)
            improved = new_margin < margin[active]
            margin[active] = torch.where(improved, new_margin, margin[active])
            x_best[active] = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best_cur)
    return x_best.detach()


def _l2_init(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    delta = torch.zeros_like(x)
    s = max(h // 5, 1)
    start = (h - s * 5) // 2
    vh = start
    for _ in range(h // s):
        vw = start
        for _ in range(w // s):
            if vh + s <= h and vw + s <= w:
                pattern = _meta_pseudo_gaussian(s, generator, x.device).view(1, 1, s, s)
                delta[:, :, vh : vh + s, vw : vw + s] += pattern * _random_sign((n, c, 1, 1), generator, x.device)
            vw += s
        vh += s
    return (x + eps * delta / (_l2_norm(delta) + 1e-12)).clamp(0, 1)


def _l2_step(
    x: torch.Tensor, x_best: torch.Tensor, eps: float, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    n, c, h, w = x.shape
    device = x.device
    delta = x_best - x
    s = max(round(math.sqrt(p * h * w)), 3)
    s = min(s + (s % 2 == 0), h)
    vh, vw = _randint(h - s + 1, generator, device), _randint(w - s + 1, generator, device)
    vh2, vw2 = _randint(h - s + 1, generator, device), _randint(w - s + 1, generator, device)
    mask1 = torch.zeros_like(x)
    mask1[:, :, vh : vh + s, vw : vw + s] = 1.0
    mask2 = torch.zeros_like(x)
    mask2[:, :, vh2 : vh2 + s, vw2 : vw2 + s] = 1.0
    norm_window1 = _l2_norm(delta[:, :, vh : vh + s, vw : vw + s], (2, 3))
    norm_image = _l2_norm(delta)
    norm_windows = _l2_norm(delta * torch.max(mask1, mask2), (2, 3))
    new = _meta_pseudo_gaussian(s, generator, device).view(1, 1, s, s) * _random_sign((n, c, 1, 1), generator, device)
    new = new + delta[:, :, vh : vh + s, vw : vw + s] / (norm_window1 + 1e-12)
    # Move the budget of both windows (plus what is left of eps) into the new window.
    budget = (torch.clamp(eps**2 - norm_image**2, min=0.0) / c + norm_windows**2).sqrt()
    new = new / (_l2_norm(new, (2, 3)) + 1e-12) * budget
    delta = delta.clone()
    delta[:, :, vh2 : vh2 + s, vw2 : vw2 + s] = 0.0
    delta[:, :, vh : vh + s, vw : vw + s] = new
    delta = delta * torch.clamp(eps / (_l2_norm(delta) + 1e-12), max=1.0)
    return (x + delta).clamp(0, 1)
