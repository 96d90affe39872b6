"""The adversarial-training tables: the training attack and threat model, the objective, the eps and
steps schedules, and the stronger validation attack."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import _Component, plugin_name


class AttackConfig(_Component):
    """The attack used to generate training examples, and the threat model (norm, eps). Validation, the
    collapse probe and evaluation attack at the same norm and eps with their own, stronger settings."""

    name: str = Field(
        default="pgd",
        description="A training attack (pipeline.attacks, those marked trains): pgd (Madry et al. 2018, "
        "arXiv:1706.06083) or fgsm (Goodfellow et al. 2015, arXiv:1412.6572; with random_start, the FGSM-RS of "
        "Wong et al. 2020), or deepfool (Moosavi-Dezfooli et al. 2016, arXiv:1511.04599: num_steps iterations, "
        "overshoot 0.02, clipped to the eps-ball; no step size, random start or restarts). fgsm takes num_steps = 1 "
        "and num_restarts = 1; method fgsm_rs needs fgsm; trades always runs PGD on its KL loss.",
    )
    norm: Literal["linf", "l2"] = Field(
        default="linf",
        description="Threat model: linf (signed-gradient steps, projection onto the box) or l2 (normalised-"
        "gradient steps, projection onto the ball). Validation, probe, test and, by default, `advtrain "
        "evaluate` use it; registered versions are tagged threat_model.norm.",
    )
    eps: float = Field(
        default=0.1,
        ge=0.0,
        le=1_000.0,
        description="Radius in pixel space [0,1] (8/255 for CIFAR-10 Linf). Training attacks use eps times "
        "schedule.eps_train_factor, ramped by schedule.eps_ramp; validation, probe, test and evaluation use it as "
        "is. 0 only with method.name = standard (adversarial methods are refused).",
    )
    num_steps: int = Field(
        default=7,
        ge=1,
        le=10_000,
        description="Attack iterations (PGD-K): each a forward + backward to the input per example, the main "
        "cost of training. fgsm: 1. schedule.steps_start can ramp up to it.",
    )
    step_size_factor: float = Field(
        default=2.5,
        gt=0.0,
        le=100.0,
        description="step_size = step_size_factor * eps / num_steps, with the current (ramped) training eps: "
        "2.5 for PGD (Madry et al. 2018), 1.25 for FGSM-RS (Wong et al. 2020). free_at's per-replay step too.",
    )
    step_size: float = Field(
        default=0.0,
        ge=0.0,
        le=1_000.0,
        description="Absolute step size in pixel units (does not follow the eps ramp); 0 = use step_size_factor.",
    )
    random_start: bool = Field(
        default=True,
        description="Start from a random point of the eps-ball around x (Linf: uniform; L2: uniform direction "
        "and radius), as in Madry et al. 2018 and, what makes FGSM-RS work, Wong et al. 2020; false: start at x.",
    )
    num_restarts: int = Field(
        default=1,
        ge=1,
        le=1_000,
        description="Independent attack runs per example, each from its own random start; each example keeps "
        "the strongest (misclassified if any run found one, else the highest loss). Costs num_restarts "
        "attacks. fgsm: 1.",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return plugin_name("attack.name", value)

    @model_validator(mode="after")
    def _inside_pixel_space(self) -> AttackConfig:
        # Pixels live in [0,1]: an Linf ball of radius 1 already holds every image, so more is a typo.
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError(f"attack.eps {self.eps} with norm linf: pixels are in [0,1], so use eps <= 1 (e.g. 8/255)")
        return self

    @model_validator(mode="after")
    def _options_it_takes(self) -> AttackConfig:
        # A key set for an attack that has no such option would be silently ignored: refuse it instead.
        from pipeline.attacks import ATTACKS

        takes = ATTACKS[self.name].training_options
        option = {"step_size_factor": "step_size", "step_size": "step_size"}
        unused = sorted(
            key
            for key in self.model_fields_set & {"step_size_factor", "step_size", "random_start", "num_restarts"}
            if option.get(key, key) not in takes
        )
        if unused:
            keys = ", ".join(f"attack.{key}" for key in unused)
            raise ValueError(
                f"attack.name = '{self.name}' does not take {keys}: remove them (it uses {', '.join(takes)})"
            )
        return self


class MethodConfig(_Component):
    """The training objective, its settings, the catastrophic-overfitting guard and adversarial weight
    perturbation."""

    name: str = Field(
        default="pgd_at",
        description="A training objective (pipeline.methods.METHODS): standard (clean inputs), pgd_at (Madry et "
        "al. 2018, arXiv:1706.06083), fgsm_rs (Wong, Rice & Kolter 2020, arXiv:2001.03994), free_at (Shafahi "
        "et al. 2019, arXiv:1904.12843), trades (Zhang et al. 2019, arXiv:1901.08573), mart (Wang et al. 2020, "
        "ICLR).",
    )
    attack_mode: Literal["eval", "train"] = Field(
        default="eval",
        description="BatchNorm mode while generating training attacks (logged; eval keeps "
        "running statistics clean of attack iterates). free_at ignores it: its perturbation comes from the "
        "training forward itself.",
    )
    beta: float = Field(
        default=6.0,
        ge=0.0,
        le=1_000.0,
        description="trades / mart: weight of the robustness regulariser, the KL divergence between clean and "
        "adversarial predictions (6 in both papers; trades with 0 is standard training). Other methods ignore it.",
    )
    replays: int = Field(
        default=4,
        ge=1,
        le=100,
        description="free_at: minibatch replays m (each an optimizer step); set run.epochs = N / m. Other methods "
        "ignore it.",
    )
    co_guard: bool = Field(
        default=True,
        description="Watch the per-epoch PGD probe for catastrophic overfitting (Wong et al. 2020); on collapse "
        "restore the last good checkpoint and go on with pgd_at PGD-`co_fallback_steps` (single-step methods) or "
        "the same method with twice the attack steps (multi-step methods, whose few-step PGD can collapse too). "
        "Adversarial methods only.",
    )
    co_drop: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="Probe robust accuracy (PGD-10 on 128 fixed validation examples, rank 0) this far below its "
        "best so far = collapse; absolute accuracy, 0.2 = 20 points.",
    )
    co_fallback_steps: int = Field(
        default=2,
        ge=2,
        le=1_000,
        description="PGD steps after a collapse (at least; multi-step methods use max(this, 2 x "
        "attack.num_steps)); the fallback attack is PGD with random start and step 2.5 * eps / steps.",
    )
    awp_gamma: float = Field(
        default=0.0,
        ge=0.0,
        le=0.1,
        description="Adversarial weight perturbation (Wu et al. 2020, arXiv:2004.05884): each step moves every "
        "conv/linear weight by awp_gamma x its norm along the gradient of the method's loss, trains there, then "
        "moves back. 0 = off; the paper used 5e-3 (TRADES, MART, wide nets) to 1e-2 (PGD-AT). Costs one more "
        "forward + backward per step. Not with free_at.",
    )
    awp_warmup_epochs: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Epochs trained without the weight perturbation before awp_gamma applies. Nets without "
        "BatchNorm need at least 1: from the first step, AWP held small_cnn at chance on Fashion-MNIST (the "
        "fixed-size perturbation outweighs the tiny gradient of the initial plateau).",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return plugin_name("method.name", value)


class ScheduleConfig(_Component):
    """How the training eps and the attack steps grow over training (pure functions of progress in
    pipeline.schedules). Validation, the probe and evaluation always use the full attack.eps."""

    eps_ramp: Literal["none", "linear", "cosine", "piecewise"] = Field(
        default="linear",
        description="Training eps over time, updated every step: none = full eps from the start; linear / "
        "cosine = 0 -> eps over schedule.eps_ramp_epochs (cosine: slow start and end); piecewise = linear "
        "between schedule.eps_milestones. A ramp avoids the early collapse of adversarial training at large "
        "radii (Gowal et al. 2018, arXiv:1810.12715).",
    )
    eps_ramp_epochs: float = Field(
        default=0.0,
        ge=0.0,
        le=100_000,
        description="linear / cosine: epochs (fractions allowed) over which eps grows from 0; 0 = no ramp.",
    )
    eps_milestones: list[list[float]] = Field(
        default_factory=list,
        description="piecewise ramp: [[epoch, fraction of eps], ...], sorted by epoch, fractions in [0, 1]; "
        "linear in between, constant beyond the ends, e.g. [[0, 0], [5, 1]]. Required by piecewise.",
    )
    eps_train_factor: float = Field(
        default=1.0,
        ge=1.0,
        le=2.0,
        description="Training attacks use attack.eps times this (at the end of the ramp); validation, the probe "
        "and every evaluation stay at attack.eps, the threat model. Above 1 trains a single-step method against "
        "a larger ball, making up for FGSM underestimating the worst case inside attack.eps.",
    )
    steps_start: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Attack steps in epoch 1, growing linearly to attack.num_steps over schedule.steps_ramp_epochs "
        "(cheap early epochs); 0 = attack.num_steps throughout.",
    )
    steps_ramp_epochs: float = Field(
        default=0.0,
        ge=0.0,
        le=100_000,
        description="Epochs to grow steps_start -> attack.num_steps (steps change once per epoch); 0 = no ramp.",
    )

    @model_validator(mode="after")
    def _milestones(self) -> ScheduleConfig:
        if any(len(m) != 2 for m in self.eps_milestones):
            raise ValueError("schedule.eps_milestones entries must be [epoch, fraction] pairs")
        epochs = [m[0] for m in self.eps_milestones]
        if self.eps_ramp == "piecewise" and not self.eps_milestones:
            raise ValueError("schedule.eps_ramp 'piecewise' needs schedule.eps_milestones = [[epoch, fraction], ...]")
        if epochs != sorted(epochs) or any(not 0.0 <= m[1] <= 1.0 for m in self.eps_milestones):
            raise ValueError("schedule.eps_milestones must be sorted by epoch with fractions in [0, 1]")
        return self


class ValidationConfig(_Component):
    """Per-epoch validation: a PGD stronger than training (more steps, restarts), at attack.eps and
    attack.norm, on the weights that would ship (the average when on). keep_best picks its best epoch;
    the final test robust accuracy uses the same attack."""

    num_steps: int = Field(default=20, ge=1, le=10_000, description="PGD steps of the validation and test attack.")
    step_size_factor: float = Field(
        default=2.5,
        gt=0.0,
        description="Validation PGD step = step_size_factor * attack.eps / validation.num_steps.",
    )
    num_restarts: int = Field(
        default=1,
        ge=1,
        description="Random starts of the validation PGD; an example is robust only if it resists every one.",
    )
    num_examples: int = Field(
        default=0,
        ge=0,
        le=100_000_000,
        description="Validation examples (the first N of the val split, divided among the workers), and the test "
        "examples of the final robust accuracy (clean test accuracy always uses the whole split). 0 = the "
        "whole split.",
    )
    batch_size: int = Field(
        default=256,
        ge=1,
        le=65_536,
        description="Examples per batch for validation, the probe and test (per worker).",
    )
