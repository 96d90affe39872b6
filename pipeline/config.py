"""Typed run configuration: one frozen model per component, strict TOML loading, dotted overrides.

A run is a TOML file in jobs/configs/ with one table per component. Overrides use the same dotted
keys (`--set attack.eps=0.1`), and so do the MLflow params (`flat_params`) and, later, Tune's search
spaces. Unknown keys, wrong types and impossible values fail at load time with a `ConfigError` that
names the key and says what is allowed.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message says which key and what to change."""


class _Component(BaseModel):
    # strict: TOML already gives typed values, so "yes" must not become True nor 2.5 become 2.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def registered_name(value: str, names: Iterable[str], kind: str) -> str:
    """`value` if it is one of a registry's `names`, else a ValueError listing them (and the closest).
    Plug-in names are checked against their registry, never against a second list kept here."""
    names = list(names)
    if value in names:
        return value
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"'{value}' is not a registered {kind}.{hint} Allowed: {', '.join(names)}")


# The registries live with their plug-ins (attacks, methods, models), which import this module for their
# config types; hence the imports inside the validators.
def _model_name(value: str) -> str:
    from pipeline.models import MODELS

    return registered_name(value, MODELS, "model")


def _training_attack_name(value: str) -> str:
    from pipeline.attacks import TRAINING_ATTACKS

    return registered_name(value, TRAINING_ATTACKS, "training attack")


def _method_name(value: str) -> str:
    from pipeline.methods import METHODS

    return registered_name(value, METHODS, "method")


class RunConfig(_Component):
    """Identity of a run: its name (the Ray Train run and checkpoint folder), length and seed."""

    name: str = Field(
        default="",
        description="Run name; empty gives a unique one. A name that has checkpoints resumes.",
    )
    epochs: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)
    storage_path: str = Field(
        default="runs",
        description="Where Ray Train keeps checkpoints (local path or a shared filesystem URI).",
    )
    keep_best: bool = Field(
        default=True,
        description="Register the epoch with the best validation robust accuracy, not the last one "
        "(robust overfitting, Rice et al. 2020); the chosen epoch is logged.",
    )
    mixed_precision: Literal["none", "bf16", "auto"] = Field(
        default="none",
        description="bf16 autocast for training forwards and attack generation (CPU and CUDA); "
        "validation, test and `advtrain evaluate` always run in fp32. `auto`: bf16 where each worker's "
        "device does bf16 in hardware (CUDA compute capability >= 8.0, CPUs with AVX-512-BF16 or AMX), "
        "fp32 elsewhere, where emulated bf16 is ~15x slower; the run's tag advtrain.mixed_precision says "
        "which ran.",
    )
    weight_average_decay: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Exponential moving average of the weights, updated after every optimizer step "
        "(Gowal et al. 2020, arXiv:2010.03593); 0 = off, e.g. 0.999. Validation, keep_best and the "
        "registered model use the averaged weights; the catastrophic-overfitting probe watches the "
        "trained ones.",
    )


class DataConfig(_Component):
    path: str = Field(default="data/digits", description="Folder written by `advtrain data prepare`.")
    loader: Literal["auto", "memory", "ray_data"] = "auto"
    batch_size: int = Field(default=128, ge=1, description="Examples per worker per step.")
    augment: Literal["none", "crop_flip"] = Field(
        default="none",
        description="Training augmentation: crop_flip = random crop after 4-pixel zero padding + horizontal "
        "flip (the CIFAR-10 standard; applied before the attack, so perturbations are of augmented images).",
    )
    memory_limit_mb: float = Field(
        default=2048.0,
        gt=0,
        description="`auto` streams through Ray Data when the train split as float32 exceeds this.",
    )


class ModelConfig(_Component):
    name: str = Field(default="small_cnn", description="A built-in architecture (pipeline.models.MODELS).")
    width: int = Field(default=1, ge=1, description="Width multiplier (wide_resnet's k).")
    depth: int = Field(default=16, ge=10, description="wide_resnet depth (6n+4).")
    activation: Literal["relu", "silu", "gelu"] = Field(
        default="relu", description="Nonlinearity; silu/gelu are smooth (Xie et al. 2020), same weights and cost."
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return _model_name(value)


class AttackConfig(_Component):
    """The attack used to generate training examples."""

    name: str = Field(default="pgd", description="A training attack (pipeline.attacks, those marked trains).")
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(default=0.1, ge=0.0, description="Radius in pixel space [0,1].")
    num_steps: int = Field(default=7, ge=1)
    step_size_factor: float = Field(default=2.5, gt=0.0, description="step_size = step_size_factor * eps / num_steps.")
    step_size: float = Field(default=0.0, ge=0.0, description="Absolute step size; 0 = use step_size_factor.")
    random_start: bool = True
    num_restarts: int = Field(default=1, ge=1)

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return _training_attack_name(value)


class MethodConfig(_Component):
    name: str = Field(default="pgd_at", description="A training objective (pipeline.methods.METHODS).")
    attack_mode: Literal["eval", "train"] = Field(
        default="eval",
        description="BatchNorm mode while generating training attacks (logged; eval keeps "
        "running statistics clean of attack iterates).",
    )
    beta: float = Field(default=6.0, ge=0.0, description="trades / mart: weight of the robustness regulariser.")
    replays: int = Field(
        default=4, ge=1, description="free_at: minibatch replays m (each an optimizer step); set run.epochs = N / m."
    )
    co_guard: bool = Field(
        default=True,
        description="Watch the per-epoch PGD probe for catastrophic overfitting; on collapse restore the last good "
        "checkpoint and go on with pgd_at PGD-`co_fallback_steps` (single-step methods) or the same method with "
        "twice the attack steps (multi-step methods, whose few-step PGD can collapse too).",
    )
    co_drop: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Probe robust accuracy this far below its best = collapse."
    )
    co_fallback_steps: int = Field(
        default=2, ge=2, description="PGD steps after a collapse (at least; multi-step methods double theirs)."
    )
    awp_gamma: float = Field(
        default=0.0,
        ge=0.0,
        le=0.1,
        description="Adversarial weight perturbation (Wu et al. 2020): each step moves every conv/linear weight by "
        "awp_gamma x its norm along the gradient of the method's loss, trains there, then moves back. 0 = off; the "
        "paper used 5e-3 (TRADES, MART, wide nets) to 1e-2 (PGD-AT). Costs one more forward + backward per step.",
    )
    awp_warmup_epochs: int = Field(
        default=0,
        ge=0,
        description="Epochs trained without the weight perturbation before awp_gamma applies. Nets without "
        "BatchNorm need at least 1: from the first step, AWP held small_cnn at chance on Fashion-MNIST (the "
        "fixed-size perturbation outweighs the tiny gradient of the initial plateau).",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return _method_name(value)


class ScheduleConfig(_Component):
    eps_ramp: Literal["none", "linear", "cosine", "piecewise"] = "linear"
    eps_ramp_epochs: float = Field(default=0.0, ge=0.0, description="Epochs over which eps grows from 0.")
    eps_milestones: list[list[float]] = Field(
        default_factory=list, description="piecewise ramp: [[epoch, fraction of eps], ...], sorted by epoch."
    )
    eps_train_factor: float = Field(
        default=1.0,
        ge=1.0,
        le=2.0,
        description="Training attacks use attack.eps times this (at the end of the ramp); validation, the probe "
        "and every evaluation stay at attack.eps, the threat model. Above 1 trains a single-step method against "
        "a larger ball, making up for FGSM underestimating the worst case inside attack.eps.",
    )
    steps_start: int = Field(default=0, ge=0, description="Attack steps in epoch 1 (0 = attack.num_steps throughout).")
    steps_ramp_epochs: float = Field(default=0.0, ge=0.0, description="Epochs to grow steps_start -> attack.num_steps.")

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


class OptimConfig(_Component):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.05, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    lr_schedule: Literal["constant", "cosine", "onecycle", "piecewise"] = "cosine"
    lr_milestones: list[float] = Field(default_factory=list, description="piecewise: epochs where lr *= lr_decay.")
    lr_decay: float = Field(default=0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _piecewise(self) -> OptimConfig:
        if self.lr_schedule == "piecewise" and not self.lr_milestones:
            raise ValueError("optim.lr_schedule 'piecewise' needs optim.lr_milestones, e.g. [50, 75]")
        return self


class ValidationConfig(_Component):
    """Per-epoch validation: a PGD stronger than training (more steps, restarts)."""

    num_steps: int = Field(default=20, ge=1)
    step_size_factor: float = Field(default=2.5, gt=0.0)
    num_restarts: int = Field(default=1, ge=1)
    num_examples: int = Field(default=0, ge=0, description="0 = the whole split.")
    batch_size: int = Field(default=256, ge=1)


class ScalingConfig(_Component):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    max_failures: int = Field(default=0, ge=-1, description="Worker-group restarts; -1 = no limit.")


class TrackingConfig(_Component):
    uri: str = Field(
        default="",
        description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI, else a local sqlite store.",
    )
    experiment: str = Field(default="advtrain", min_length=1)
    registered_model: str = Field(default="", description="Registry name; empty skips registering.")
    alias: str = Field(
        default="challenger",
        description="Alias moved to each newly registered version (empty: none); `champion` is only set by promotion.",
    )

    @model_validator(mode="after")
    def _not_champion(self) -> TrackingConfig:
        if self.alias == "champion":
            raise ValueError("tracking.alias cannot be 'champion': only `advtrain promote` sets it, through its gates")
        return self


class Config(_Component):
    """The whole run: one frozen component config per table of the TOML file."""

    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    method: MethodConfig = MethodConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optim: OptimConfig = OptimConfig()
    validation: ValidationConfig = ValidationConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        from pipeline.methods import METHODS

        spec = METHODS[_method_name(self.method.name)]  # configs built by model_copy skip field validators
        if spec.adversarial and self.attack.eps == 0.0:
            raise ValueError(
                f"attack.eps is 0 but method.name is '{self.method.name}': set attack.eps > 0 "
                "or use method.name = 'standard'"
            )
        if spec.attack is not None and self.attack.name != spec.attack:
            raise ValueError(
                f"method.name '{self.method.name}' generates with {spec.attack}: set attack.name = '{spec.attack}'"
            )
        if self.attack.name == "fgsm" and (self.attack.num_restarts != 1 or self.attack.num_steps != 1):
            raise ValueError(
                "attack.name = 'fgsm' is one step with no restarts: set attack.num_steps = 1 and "
                "attack.num_restarts = 1, or use attack.name = 'pgd'"
            )
        if self.method.awp_gamma > 0 and not spec.weight_perturbation:
            takes = ", ".join(name for name, other in METHODS.items() if other.weight_perturbation)
            raise ValueError(
                f"method.awp_gamma applies to {takes}, not {self.method.name} (its replays step weights and "
                "perturbation from one backward): set method.awp_gamma = 0 or change method.name"
            )
        return self


def _tables(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    return {name: field.annotation for name, field in model.model_fields.items()}  # type: ignore[misc]


def _check_keys(raw: dict[str, Any]) -> None:
    """Reject unknown tables/keys with a suggestion, before pydantic's terser message."""
    tables = _tables(Config)
    for table, values in raw.items():
        if table not in tables:
            raise ConfigError(_unknown(table, list(tables), "table"))
        if not isinstance(values, dict):
            raise ConfigError(f"[{table}] must be a table of keys, got {values!r}")
        allowed = list(tables[table].model_fields)
        for key in values:
            if key not in allowed:
                raise ConfigError(_unknown(f"{table}.{key}", [f"{table}.{k}" for k in allowed]))


def _unknown(key: str, allowed: list[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{key}'.{hint} Allowed: {', '.join(sorted(allowed))}"


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        allowed = ""
        if e["type"] == "literal_error":
            allowed = f" (allowed: {e['ctx']['expected']})"
        got = e.get("input")
        where = f"{key}: " if key else ""
        lines.append(f"{where}{e['msg']}{allowed}; got {got!r}" if key else e["msg"])
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """`attack.eps=0.2` -> ("attack.eps", 0.2); values are TOML literals, bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like table.key=value, e.g. attack.eps=0.1")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key '{key}' must be table.key, e.g. attack.eps")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {table: dict(values) for table, values in raw.items()}
    for key, value in overrides.items():
        table, name = key.split(".", 1)
        merged.setdefault(table, {})[name] = value
    return merged


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    raw = apply_overrides(raw, overrides or {})
    _check_keys(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a TOML run file and apply dotted overrides; raises ConfigError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; the recipes live in jobs/configs/")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def flat_params(config: Config) -> dict[str, Any]:
    """{"attack.eps": 0.2, ...}: the MLflow params view, same keys as overrides."""
    return {f"{table}.{key}": value for table, values in config.model_dump().items() for key, value in values.items()}


def to_toml(config: Config) -> str:
    """The resolved config as TOML (saved with every run and checkpoint)."""
    lines = []
    for table, values in config.model_dump().items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
