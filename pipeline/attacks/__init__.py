"""Attacks as pure functions sharing one call signature: `attack(model, x, y, *, eps, norm, ...) -> x_adv`.

Contract (every attack, tested): x in [0,1]; x_adv detached, in the eps-ball (Linf or L2) and in [0,1];
gradients (where used) w.r.t. the input only, via torch.autograd.grad; the model's train/eval mode is
never changed; randomness from `generator` when given.

| name       | paper                                  | kind                                |
|------------|----------------------------------------|-------------------------------------|
| fgsm       | Goodfellow et al. 2015                 | one signed step (FGSM-RS with rs)   |
| pgd        | Madry et al. 2018                      | CE, random start, restarts          |
| pgd_cw     | Madry et al. 2018 / Carlini-Wagner 2017| PGD on the CW margin loss           |
| apgd_ce    | Croce & Hein 2020                      | Auto-PGD, cross-entropy             |
| apgd_dlr   | Croce & Hein 2020                      | Auto-PGD, DLR loss                  |
| apgd_t     | Croce & Hein 2020                      | targeted DLR over the top-k classes |
| square     | Andriushchenko et al. 2020             | score-based black-box (Linf, L2)    |
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from pipeline.attacks.apgd import apgd, apgd_targeted
from pipeline.attacks.pgd import Attack, Norm, fgsm, pgd
from pipeline.attacks.square import square

ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "pgd_cw": partial(pgd, loss="cw"),
    "apgd_ce": partial(apgd, loss="ce"),
    "apgd_dlr": partial(apgd, loss="dlr"),
    "apgd_t": apgd_targeted,
    "square": square,
}


def get_attack(name: str) -> Callable[..., torch.Tensor]:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack '{name}'; allowed: {', '.join(ATTACKS)}") from None


__all__ = ["ATTACKS", "Attack", "Norm", "apgd", "apgd_targeted", "fgsm", "get_attack", "pgd", "square"]
