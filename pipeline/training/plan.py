"""The per-epoch plan: everything one epoch trains with, derived from the config, the epoch and the
collapse guard's state. One object instead of a dozen loose arguments. Pure torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import AttackConfig, Config
from pipeline.methods import Method, get_method
from pipeline.methods import replays as method_replays
from pipeline.schedules import attack_steps_at, eps_by_step
from pipeline.training.guard import fallback_training
from pipeline.training.perturbation import weight_perturbation_gamma


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with.

    `method` is built fresh every epoch, so free_at's perturbation restarts at zero and a resumed or
    restored epoch trains exactly as it first did. `eps_for_step(step)` is the training eps of the
    epoch's step (ramps are per step). `replays` > 1 (free_at) steps the optimizer that many times per
    minibatch. `awp_gamma` > 0 turns on adversarial weight perturbation. `fallback` once the collapse
    guard fired (method and attack are then the fallback's)."""

    method_name: str
    method: Method
    attack: AttackConfig
    eps_for_step: Callable[[int], float]
    attack_mode: str = "train"
    replays: int = 1
    augment: str = "none"
    awp_gamma: float = 0.0
    fallback: bool = False


def epoch_schedule(config: Config, epoch: int, *, steps_per_epoch: int) -> tuple[Callable[[int], float], AttackConfig]:
    """This epoch's eps-by-step function and attack config (attack steps may grow over training)."""
    schedule, attack = config.schedule, config.attack
    eps_for_step = eps_by_step(
        epoch,
        steps_per_epoch=steps_per_epoch,
        eps=attack.eps * schedule.eps_train_factor,
        ramp=schedule.eps_ramp,
        ramp_epochs=schedule.eps_ramp_epochs,
        milestones=schedule.eps_milestones,
    )
    num_steps = attack_steps_at(
        epoch, start=schedule.steps_start, final=attack.num_steps, ramp_epochs=schedule.steps_ramp_epochs
    )
    return eps_for_step, attack.model_copy(update={"num_steps": num_steps})


def plan_epoch(config: Config, epoch: int, *, steps_per_epoch: int, fallback: bool = False) -> EpochPlan:
    """The plan of `epoch` (1-based) of a run of `config`; `fallback` once the collapse guard fired."""
    eps_for_step, attack = epoch_schedule(config, epoch, steps_per_epoch=steps_per_epoch)
    name = config.method.name
    if fallback:
        name, attack = fallback_training(name, config.attack, min_steps=config.method.co_fallback_steps)
    return EpochPlan(
        method_name=name,
        method=get_method(name, config.method),
        attack=attack,
        eps_for_step=eps_for_step,
        attack_mode=config.method.attack_mode,
        replays=method_replays(config.method.name, config.method.replays),
        augment=config.data.augment,
        awp_gamma=weight_perturbation_gamma(config.method, epoch),
        fallback=fallback,
    )
