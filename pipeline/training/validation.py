"""Validation counts: clean and PGD-robust correct predictions, as sums a caller can all-reduce across
ranks before dividing. Pure torch."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks import pgd
from pipeline.models import input_memory_format


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted labels for x (pixels in [0,1]); the caller sets the mode (eval for evaluation)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(x[start : start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device="cpu")


def clean_and_robust_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    num_steps: int,
    step_size_factor: float,
    num_restarts: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Counts of clean and PGD-robust correct predictions (model in eval mode, restored after).

    Robust counts a point only if it is also clean-correct, so robust <= clean always holds.
    """
    was_training = model.training
    model.eval()
    layout = input_memory_format(model)
    clean = torch.zeros((), dtype=torch.int64, device=device)  # on the device: one read-back at the end
    robust = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device).contiguous(memory_format=layout)
            yb = y[start : start + batch_size].to(device)
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
            clean += ok.sum()
            if eps > 0:
                x_adv = pgd(
                    model,
                    xb,
                    yb,
                    eps=eps,
                    step_size=step_size_factor * eps / num_steps,
                    num_steps=num_steps,
                    norm=norm,  # type: ignore[arg-type]
                    num_restarts=num_restarts,
                    generator=generator,
                )
                with torch.no_grad():
                    ok = ok & (model(x_adv).argmax(1) == yb)
            robust += ok.sum()
    finally:
        model.train(was_training)
    return {"clean_correct": float(clean), "robust_correct": float(robust), "count": float(len(x))}


def pgd20_correct(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, device: torch.device
) -> dict[str, float]:
    """Clean and robust counts under the reporting protocol of benchmarks/RESULTS.md: PGD-20, step
    2.5 eps / 20, one random start from a generator seeded 0, batches of 500. One place, so that every
    benchmark's "PGD-20" column means the same attack."""
    return clean_and_robust_correct(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        num_steps=20,
        step_size_factor=2.5,
        num_restarts=1,
        batch_size=500,
        device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )
