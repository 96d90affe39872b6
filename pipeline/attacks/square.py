"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, arXiv:1912.00049): score-based,
black-box, Linf and L2.

Random search: each query changes one square window (side s set by the schedule on p, the fraction of
pixels changed, which halves at fixed points of the query budget) and keeps the change if the margin
loss z_y - max_{i!=y} z_i went down. Linf windows get +-eps per channel (vertical-stripe init); L2
windows get the paper's "meta pseudo-gaussian" pattern, with the budget moved from a second window.
Uses only the model's outputs, never gradients: stronger than the white-box attacks only when gradients
are masked (AutoAttack's sanity check).

No query reads the device back (issue 31): the window side depends only on the query index, which the
host knows; window positions, signs and the pattern's transposition are drawn on the device and applied
as masks; the examples still being attacked are compacted once per block of queries (see `_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.attacks.losses import margin_loss

# Queries between two compactions of the still-unbroken examples. Compacting needs nonzero(), a host
# sync; between compactions the fooled examples stay in the batch (they no longer change) and cost
# forward passes instead. Measured on CPU (64 examples, 1000 queries; small_cnn on 8x8 digits and on
# 3x32x32): within +-5% of compacting every query, where most examples break early too, and no
# different from blocks that grow 1, 2, 4, ... 32; on a GPU one stall per 32 forward passes.
COMPACT_EVERY = 32


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


def _blocks(num_queries: int) -> Iterator[range]:
    """Queries 1..num_queries-1 (query 0 is the initialisation) in blocks of COMPACT_EVERY."""
    for start in range(1, num_queries, COMPACT_EVERY):
        yield range(start, min(start + COMPACT_EVERY, num_queries))


def _random_sign(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


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


def _meta_pseudo_gaussian(s: int, device: torch.device) -> torch.Tensor:
    delta = torch.zeros(s, s, device=device)
    delta[: s // 2] = _eta_rectangles(s // 2, s, device)
    delta[s // 2 :] = -_eta_rectangles(s - s // 2, s, device)
    return delta / delta.pow(2).sum().sqrt()


def _maybe_transposed(pattern: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # The paper transposes the pattern with probability 1/2; decided on the device, not with an `if`.
    flip = torch.rand(1, generator=generator, device=pattern.device) > 0.5
    return torch.where(flip, pattern.t(), pattern)


def _l2_norm(t: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


def _offsets(
    num_top: int, num_left: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A window's top in [0, num_top) and left in [0, num_left) (at least one position each), (1,1) each,
    drawn on the device: one window for the whole batch per query, as AutoAttack does."""
    top = torch.randint(0, max(num_top, 1), (1, 1), generator=generator, device=device)
    left = torch.randint(0, max(num_left, 1), (1, 1), generator=generator, device=device)
    return top, left


def _window(grid: tuple[torch.Tensor, torch.Tensor], s: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """(H,W) bool mask of the s x s window at (top, left); grid = (arange(H)[:, None], arange(W)[None, :]).
    A mask instead of slicing by the drawn offset, which would need the offset on the host."""
    rows, cols = grid
    return (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)


def _place(
    grid: tuple[torch.Tensor, torch.Tensor], pattern: torch.Tensor, top: torch.Tensor, left: torch.Tensor
) -> torch.Tensor:
    """The (s,s) pattern at (top, left) in an (H,W) image of zeros."""
    s = pattern.shape[0]
    rows, cols = grid
    return pattern[(rows - top).clamp(0, s - 1), (cols - left).clamp(0, s - 1)] * _window(grid, s, top, left)


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
    """Untargeted Square attack; x (N,C,H,W) in [0,1]. An example stops changing once it is fooled.

    `rescale_schedule=False` is AutoAttack's setting (its SquareAttack(resc_schedule=False)): with 5000
    queries p halves at queries 10, 50, 200, 500, 1000, 2000, 4000 and ends at p_init/128; True stretches
    the 10,000-query schedule over the budget (p_init/512 from 80% of it on, 1-pixel windows on 28x28).
    One host sync per block of queries (`_blocks`), none inside a block.
    """
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    device = x.device
    n, c, h, w = x.shape
    grid = (torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :])
    patterns: dict[int, torch.Tensor] = {}  # L2: one pattern per window side, built once

    def propose(x_cur: torch.Tensor, x_best_cur: torch.Tensor, query: int) -> torch.Tensor:
        p = p_selection(p_init, query, num_queries, rescale=rescale_schedule)
        if norm == "linf":
            s = min(max(round(math.sqrt(p * h * w)), 1), h - 1)
            return _linf_step(x_cur, x_best_cur, eps, s, grid, generator)
        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + (s % 2 == 0), h)
        if s not in patterns:
            patterns[s] = _meta_pseudo_gaussian(s, device)
        return _l2_step(x_cur, x_best_cur, eps, patterns[s], grid, generator)

    with torch.no_grad():
        if norm == "linf":
            x_best = (x + eps * _random_sign((n, c, 1, w), generator, device)).clamp(0, 1)
        else:
            x_best = _l2_init(x, eps, generator)
        margin = margin_loss(model(x_best), y)
        for block in _blocks(num_queries):
            active = (margin > 0).nonzero().squeeze(1)  # the block's one host sync
            if active.numel() == 0:
                break
            x_best[active], margin[active] = _search(
                model, x[active], y[active], x_best[active], margin[active], block, propose
            )
    return x_best.detach()


def _search(model, x, y, x_best, margin, queries: range, propose) -> tuple[torch.Tensor, torch.Tensor]:
    """Random search over `queries` on a fixed set of examples, without reading anything back."""
    for query in queries:
        x_new = propose(x, x_best, query)
        new_margin = margin_loss(model(x_new), y)
        # AutoAttack stops querying an example once it is fooled; here it stays until the next compaction
        # but no longer changes.
        improved = (new_margin < margin) & (margin > 0)
        margin = torch.where(improved, new_margin, margin)
        x_best = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best)
    return x_best, margin


def _linf_step(x, x_best, eps: float, s: int, grid, generator: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    top, left = _offsets(h - s, w - s, generator, x.device)
    signs = eps * _random_sign((n, c, 1, 1), generator, x.device)
    # The window is set to x +- eps per channel (AutoAttack adds 2 eps to x_best and projects: the same
    # point); outside it x_best is already in the ball, so only [0,1] needs enforcing.
    return torch.where(_window(grid, s, top, left), (x + signs).clamp(0, 1), x_best)


def _l2_init(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    delta = torch.zeros_like(x)
    s = max(h // 5, 1)
    pattern = _meta_pseudo_gaussian(s, x.device)
    start = (h - s * 5) // 2
    vh = start
    for _ in range(h // s):
        vw = start
        for _ in range(w // s):
            if vh + s <= h and vw + s <= w:
                tile = _maybe_transposed(pattern, generator).view(1, 1, s, s)
                delta[:, :, vh : vh + s, vw : vw + s] += tile * _random_sign((n, c, 1, 1), generator, x.device)
            vw += s
        vh += s
    return (x + eps * delta / (_l2_norm(delta) + 1e-12)).clamp(0, 1)


def _l2_step(x, x_best, eps: float, pattern: torch.Tensor, grid, generator: torch.Generator | None) -> torch.Tensor:
    n, c, h, w = x.shape
    s = pattern.shape[0]
    device = x.device
    delta = x_best - x
    top1, left1 = _offsets(h - s + 1, w - s + 1, generator, device)
    top2, left2 = _offsets(h - s + 1, w - s + 1, generator, device)
    window1 = _window(grid, s, top1, left1)
    windows = window1 | _window(grid, s, top2, left2)
    placed = _place(grid, _maybe_transposed(pattern, generator), top1, left1)
    norm_window1 = _l2_norm(delta * window1, (2, 3))
    norm_image = _l2_norm(delta)
    norm_windows = _l2_norm(delta * windows, (2, 3))
    new = placed * _random_sign((n, c, 1, 1), generator, device) + delta * window1 / (norm_window1 + 1e-12)
    # Move the budget of both windows (plus what is left of eps) into the new window.
    budget = (torch.clamp(eps**2 - norm_image**2, min=0.0) / c + norm_windows**2).sqrt()
    new = new / (_l2_norm(new, (2, 3)) + 1e-12) * budget
    # Window 2 emptied, window 1 replaced (`new` is zero outside it).
    delta = torch.where(windows, 0.0, delta) + new
    delta = delta * torch.clamp(eps / (_l2_norm(delta) + 1e-12), max=1.0)
    return (x + delta).clamp(0, 1)
