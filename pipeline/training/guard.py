"""The catastrophic-overfitting guard (Wong, Rice & Kolter 2020, "Fast is better than free"): a PGD probe
on a fixed validation batch every epoch; when its accuracy collapses, the run goes back to the last good
epoch and trains with a safer method and attack for the rest of the run. Pure torch: no ray, no mlflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import AttackConfig
from pipeline.methods import method_spec


@dataclass
class CollapseGuard:
    """The guard's state (checkpointed in `TrainState`): once a collapse fired, training goes on with the
    fallback method and attack for the rest of the run; `events` records each one."""

    fallback: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)

    def fire(self, event: dict[str, Any]) -> None:
        self.fallback = True
        self.events.append(event)

    def state_dict(self) -> dict[str, Any]:
        return {"fallback": self.fallback, "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fallback, self.events = bool(state["fallback"]), list(state["events"])


def collapsed(probe_acc: float, best_probe_acc: float, *, drop: float) -> bool:
    """Catastrophic overfitting (Wong et al. 2020): PGD accuracy on the fixed probe batch falls more than
    `drop` below the best it reached. Single-step training then yields a model that FGSM cannot fool
    but PGD fools almost always; the collapse happens within an epoch, so one epoch's drop is enough."""
    return probe_acc < best_probe_acc - drop


def fallback_attack(attack: AttackConfig, *, num_steps: int) -> AttackConfig:
    """The safer training attack after a collapse: PGD-`num_steps` with random start and the usual
    2.5 * eps / steps step (smaller steps than the single-step or few-step attack that collapsed)."""
    return attack.model_copy(
        update={"name": "pgd", "num_steps": num_steps, "step_size_factor": 2.5, "step_size": 0.0, "random_start": True}
    )


def fallback_training(method_name: str, attack: AttackConfig, *, min_steps: int) -> tuple[str, AttackConfig]:
    """What a run trains with after a collapse. Single-step methods switch to pgd_at with PGD-`min_steps`.
    Few-step PGD collapses too (MART with PGD-3 did on Fashion-MNIST at the one-cycle peak, see
    benchmarks/history/), so a multi-step method keeps its objective with twice the attack steps."""
    if method_spec(method_name).single_step:
        return "pgd_at", fallback_attack(attack, num_steps=min_steps)
    return method_name, fallback_attack(attack, num_steps=max(min_steps, 2 * attack.num_steps))
