"""Training objectives: `method(model, attack_model, x, y, *, ...) -> (loss, logits)`.

`model` is what the optimizer steps (DDP-wrapped under Ray Train), `attack_model` the same network
unwrapped: attacks run on it so their input-gradient passes never trigger DDP's all-reduce. The
method states the BatchNorm mode for attack generation (`attack_mode`) and puts the model back in
train mode for the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import get_attack
from pipeline.config import AttackConfig
from pipeline.schedules import step_size

MethodResult = tuple[torch.Tensor, torch.Tensor]


def _generate(
    attack_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig,
    eps: float,
    attack_mode: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    attack_model.train(attack_mode == "train")
    try:
        return get_attack(attack.name)(
            attack_model,
            x,
            y,
            eps=eps,
            step_size=step_size(eps, num_steps=attack.num_steps, factor=attack.step_size_factor),
            num_steps=attack.num_steps,
            norm=attack.norm,
            random_start=attack.random_start,
            num_restarts=attack.num_restarts,
            generator=generator,
        )
    finally:
        attack_model.train(True)


def standard(model, attack_model, x, y, *, attack, eps, attack_mode, generator=None) -> MethodResult:
    """Plain empirical risk minimisation on clean inputs (the baseline)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def pgd_at(model, attack_model, x, y, *, attack, eps, attack_mode, generator=None) -> MethodResult:
    """PGD adversarial training (Madry et al. 2018, arXiv:1706.06083): minimise the loss on PGD examples."""
    if eps == 0:
        return standard(model, attack_model, x, y, attack=attack, eps=eps, attack_mode=attack_mode)
    x_adv = _generate(attack_model, x, y, attack=attack, eps=eps, attack_mode=attack_mode, generator=generator)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def fgsm_rs(model, attack_model, x, y, *, attack, eps, attack_mode, generator=None) -> MethodResult:
    """FGSM with random start (Wong, Rice & Kolter 2020, arXiv:2001.03994, "Fast is better than free").

    Uniform start in the eps-ball, one signed step of `step_size_factor * eps` (1.25 in the paper).
    Same objective as pgd_at; the attack config (name fgsm, num_steps 1) makes it single-step.
    """
    return pgd_at(model, attack_model, x, y, attack=attack, eps=eps, attack_mode=attack_mode, generator=generator)


Method = Callable[..., MethodResult]
METHODS: dict[str, Method] = {"standard": standard, "pgd_at": pgd_at, "fgsm_rs": fgsm_rs}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; allowed: {', '.join(METHODS)}") from None
