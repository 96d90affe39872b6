"""Attacks as pure functions sharing one call signature (`Attack`): `attack(model, x, y, *, eps, norm,
generator, **its own options) -> x_adv`. No attack takes a catch-all `**kwargs`, so an option it does not
have raises TypeError instead of being ignored.

Contract (every attack, tested): x in [0,1]; x_adv detached, in the eps-ball (Linf or L2) and in [0,1];
gradients (where used) w.r.t. the input only, via torch.autograd.grad; the model's train/eval mode is
never changed; randomness from `generator` when given.

| name       | paper                                  | kind                                | trains |
|------------|----------------------------------------|-------------------------------------|--------|
| fgsm       | Goodfellow et al. 2015                 | one signed step (FGSM-RS with rs)   | yes    |
| pgd        | Madry et al. 2018                      | CE, random start, restarts          | yes    |
| pgd_cw     | Madry et al. 2018 / Carlini-Wagner 2017| PGD on the CW margin loss           |        |
| apgd_ce    | Croce & Hein 2020                      | Auto-PGD, cross-entropy             |        |
| apgd_dlr   | Croce & Hein 2020                      | Auto-PGD, DLR loss                  |        |
| apgd_t     | Croce & Hein 2020                      | targeted DLR over the top-k classes |        |
| square     | Andriushchenko et al. 2020             | score-based black-box (Linf, L2)    |        |
| mi_fgsm    | Dong et al. 2018                       | momentum iterative FGSM (transfer)  |        |
| deepfool   | Moosavi-Dezfooli et al. 2016           | minimal norm, linearised boundary   | yes    |
| fab_t      | Croce & Hein 2020 (FAB)                | minimal norm, targeted (AutoAttack) |        |
| cw_l2      | Carlini & Wagner 2017                  | minimal L2, tanh space, binary c    |        |
| fmn        | Pintor et al. 2021                     | fast minimum norm (Linf, L2)        |        |

Minimal-norm attacks (deepfool, fab_t, cw_l2, fmn) search for the smallest perturbation that changes the prediction:
with eps=math.inf they return it unbounded, with a finite eps its projection onto the ball
(pipeline/attacks/minimal.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from pipeline.attacks.apgd import apgd, apgd_targeted
from pipeline.attacks.cw import cw_l2
from pipeline.attacks.deepfool import deepfool
from pipeline.attacks.fab import fab
from pipeline.attacks.fmn import fmn
from pipeline.attacks.momentum import mi_fgsm
from pipeline.attacks.pgd import Attack, Norm, fgsm, pgd
from pipeline.attacks.square import square


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack. `trains`: the training attack config (`attack.name`) may name it;
    `training_options`: which of the config's step_size, num_steps, random_start and num_restarts it
    takes (APGD and Square set their own step schedules and are evaluation attacks)."""

    fn: Attack
    trains: bool = False
    training_options: tuple[str, ...] = ()


PGD_OPTIONS = ("step_size", "num_steps", "random_start", "num_restarts")


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(fgsm, trains=True, training_options=PGD_OPTIONS),
    "pgd": AttackSpec(pgd, trains=True, training_options=PGD_OPTIONS),
    "pgd_cw": AttackSpec(partial(pgd, loss="cw")),
    "apgd_ce": AttackSpec(partial(apgd, loss="ce")),
    "apgd_dlr": AttackSpec(partial(apgd, loss="dlr")),
    "apgd_t": AttackSpec(apgd_targeted),
    "square": AttackSpec(square),
    "mi_fgsm": AttackSpec(mi_fgsm),
    # DeepFool as a training attack: its iterations come from attack.num_steps, clipped to the eps-ball.
    "deepfool": AttackSpec(deepfool, trains=True, training_options=("num_steps",)),
    "fab_t": AttackSpec(fab),
    "cw_l2": AttackSpec(cw_l2),
    "fmn": AttackSpec(fmn),
}
TRAINING_ATTACKS = tuple(name for name, spec in ATTACKS.items() if spec.trains)


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name].fn
    except KeyError:
        raise ValueError(f"unknown attack '{name}'; allowed: {', '.join(ATTACKS)}") from None


__all__ = [
    "ATTACKS",
    "TRAINING_ATTACKS",
    "Attack",
    "AttackSpec",
    "Norm",
    "apgd",
    "apgd_targeted",
    "cw_l2",
    "deepfool",
    "fab",
    "fgsm",
    "fmn",
    "get_attack",
    "mi_fgsm",
    "pgd",
    "square",
]
