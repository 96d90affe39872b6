"""The run's other tables (identity, data, network, optimizer, resources, tracking) and `Config`, the
whole run. Every field's `description` is its reference documentation: docs/configuration.md is generated
from it (`python -m pipeline.config_docs`), so it says what the key does, its unit, what 0 means and the
paper it implements."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.adversarial import AttackConfig, MethodConfig, ScheduleConfig, ValidationConfig
from pipeline.config.base import _Component, plugin_name
from pipeline.errors import checked_alias, checked_name


class RunConfig(_Component):
    """Identity of a run: its name (the Ray Train run and checkpoint folder), length, seed, precision, and
    which weights it ships."""

    name: str = Field(
        default="",
        description="Run name: the Ray Train run and its checkpoint folder `run.storage_path/<name>`. Empty gives "
        "a unique one (`<config file stem>-<YYYYmmdd-HHMMSS>-<4 hex digits>`). A name that has checkpoints "
        "resumes after the last one (as `--resume NAME` does); a finished run's name is refused.",
    )
    epochs: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Training epochs: passes over the train split, each followed by validation, the collapse "
        "probe and a checkpoint; the LR schedule spans them. free_at steps each minibatch `method.replays` "
        "times, so an epoch costs about that many clean epochs: set N / m.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Base seed: initial weights (the same on every rank), the in-memory loader's data order, and "
        "per epoch and rank the attacks' random starts and augmentation (seed * 1000003 + epoch * 1009 + rank), "
        "so a resumed epoch replays exactly; also seeds the probe and test attacks. Saved with every checkpoint "
        "(the resolved config).",
    )
    storage_path: str = Field(
        default="runs",
        description="Where Ray Train keeps checkpoints (local path or a shared filesystem URI): a relative path "
        "is resolved against the directory the command runs in; on a cluster, storage every node reaches. A "
        "search writes `<storage_path>/<search>/best_config.toml` there too.",
    )
    keep_best: bool = Field(
        default=True,
        description="Register the epoch with the best validation robust accuracy, not the last one "
        "(robust overfitting, Rice et al. 2020, arXiv:2002.11569); the chosen epoch is logged "
        "(`registered/epoch`, version tag `epoch`). false: the last epoch's weights (their average when "
        "run.weight_average_decay > 0).",
    )
    mixed_precision: Literal["none", "bf16", "auto"] = Field(
        default="none",
        description="bf16 autocast for training forwards and attack generation (CPU and CUDA); "
        "validation, test and `advtrain evaluate` always run in fp32. `auto`: bf16 where each worker's "
        "device does bf16 in hardware (CUDA compute capability >= 8.0, CPUs with AVX-512-BF16 or AMX), "
        "fp32 elsewhere, where emulated bf16 is ~15x slower; the run's tag advtrain.mixed_precision says "
        "which ran. Weights, gradients and optimizer state stay fp32.",
    )
    weight_average_decay: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Exponential moving average of the weights, updated after every optimizer step "
        "(Gowal et al. 2020, arXiv:2010.03593); 0 = off, e.g. 0.999, warmed up as min(decay, (1+n)/(10+n)) "
        "at the n-th update. Validation, keep_best and the registered model use the averaged weights; the "
        "catastrophic-overfitting probe watches the trained ones. Checkpoints hold both.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes a folder under run.storage_path and an MLflow filter value.
        return value and checked_name(value, "run.name")


class DataConfig(_Component):
    """The dataset (a folder written by `advtrain data prepare`) and how each worker reads its shard."""

    path: str = Field(
        default="data/digits",
        description="Folder written by `advtrain data prepare` (metadata.json + train/val/test Parquet shards), "
        "validated before anything is recorded. A relative path is resolved against the directory the command "
        "runs in; on a cluster, storage every node reaches.",
    )
    loader: Literal["auto", "memory", "ray_data"] = Field(
        default="auto",
        description="How workers get the train split: `memory` loads it in every worker, which trains on its "
        "rank's stride of one shared permutation per epoch; `ray_data` streams it through Ray Data (its read "
        "tasks need CPUs beyond scaling.num_workers x scaling.cpus_per_worker); `auto` = memory when the split "
        "as float32 fits data.memory_limit_mb, else ray_data. Logged as the param `data.loader_used`.",
    )
    batch_size: int = Field(
        default=128,
        ge=1,
        le=65_536,
        description="Examples per worker per step: the global batch is scaling.num_workers times this (optim.lr "
        "is not scaled with it).",
    )
    augment: Literal["none", "crop_flip"] = Field(
        default="none",
        description="Training augmentation: crop_flip = random crop after 4-pixel zero padding + horizontal "
        "flip (the CIFAR-10 standard; applied before the attack, so perturbations are of augmented images).",
    )
    memory_limit_mb: float = Field(
        default=2048.0,
        gt=0,
        le=16_777_216,
        description="MiB. With data.loader = auto, the train split is streamed through Ray Data when its size as "
        "float32 (N x C x H x W x 4 bytes) exceeds this, and held in each worker's memory otherwise.",
    )


class ModelConfig(_Component):
    """The network: a built-in architecture behind a Normalize layer, so it takes pixels in [0,1]. Its
    architecture record (name, width, depth, activation, shape, classes) is stored beside the weights."""

    name: str = Field(
        default="small_cnn",
        description="A built-in architecture (pipeline.models.MODELS): small_cnn (two conv blocks + MLP, the "
        "TRADES MNIST net scaled; square images with a side divisible by 4), preact_resnet18 (PreAct "
        "ResNet-18, He et al. 2016, the net of Wong et al. 2020 and Rice et al. 2020), wide_resnet "
        "(WRN-depth-width, Zagoruyko & Komodakis 2016).",
    )
    width: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Width multiplier: channels times this for small_cnn (32/64 conv channels, 200 hidden) and "
        "preact_resnet18 (64 base channels); wide_resnet's k (10 for WRN-34-10). Compute grows about as its "
        "square.",
    )
    depth: int = Field(
        default=16,
        ge=10,
        le=1_000,
        description="wide_resnet only: layers, 6n+4 (16, 28, 34; checked when the model is built), "
        "e.g. 34 for WRN-34-10 (Madry et al., TRADES). The other architectures ignore it.",
    )
    activation: Literal["relu", "silu", "gelu"] = Field(
        default="relu",
        description="Nonlinearity; silu/gelu are smooth (Xie et al. 2020, arXiv:2006.14536), same weights and "
        "cost. Measured here (FGSM-RS, Fashion-MNIST, small_cnn) SiLU was 5.6 points below ReLU in robust "
        "accuracy, so the recipes keep relu.",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        return plugin_name("model.name", value)


class OptimConfig(_Component):
    """The optimizer and the learning-rate schedule (a multiplier of optim.lr, updated every optimizer
    step)."""

    name: Literal["sgd", "adam"] = Field(
        default="sgd",
        description="sgd (with optim.momentum, no Nesterov) or adam (torch's Adam, default betas; weight decay "
        "as an L2 term, not AdamW).",
    )
    lr: float = Field(
        default=0.05,
        gt=0.0,
        le=10.0,
        description="Base learning rate (the peak for onecycle), the same for any number of workers or batch size.",
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd momentum; adam ignores it.")
    weight_decay: float = Field(
        default=5e-4,
        ge=0.0,
        le=1.0,
        description="L2 penalty the optimizer adds to every parameter's gradient (5e-4 is the usual CIFAR-10 "
        "setting); 0 = none.",
    )
    lr_schedule: Literal["constant", "cosine", "onecycle", "piecewise"] = Field(
        default="cosine",
        description="constant; cosine = half cosine from lr to 0 over run.epochs; onecycle = linear up to lr at "
        "40% of training, then down to 0 (Wong et al. 2020); piecewise = times optim.lr_decay at each "
        "optim.lr_milestones epoch (Madry et al. 2018; Rice et al. 2020 decay 10x at 50% and 75%).",
    )
    lr_milestones: list[float] = Field(
        default_factory=list,
        description="piecewise: epochs (fractions allowed) where lr *= lr_decay, e.g. [50, 75]; required by piecewise.",
    )
    lr_decay: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="piecewise: factor applied at each milestone (0.1 = 10x lower).",
    )

    @model_validator(mode="after")
    def _piecewise(self) -> OptimConfig:
        if self.lr_schedule == "piecewise" and not self.lr_milestones:
            raise ValueError("optim.lr_schedule 'piecewise' needs optim.lr_milestones, e.g. [50, 75]")
        return self


class ScalingConfig(_Component):
    """Ray Train resources: how many workers (data-parallel ranks) and what each one reserves."""

    num_workers: int = Field(
        default=2,
        ge=1,
        le=4_096,
        description="Ray Train workers (DDP ranks), each attacking its own shard with its own replica; "
        "gradients are all-reduced. A Tune trial uses this many too.",
    )
    use_gpu: bool = Field(
        default=False,
        description="One GPU per worker (nccl collectives); false: CPU workers (gloo).",
    )
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0.0,
        le=1_024,
        description="CPUs Ray reserves per worker, and torch's intra-op threads (its integer part, at least 1). "
        "Fractions let workers share CPUs, e.g. 0.5 to leave room for Ray Data's read tasks.",
    )
    max_failures: int = Field(
        default=0,
        ge=-1,
        le=10_000,
        description="Worker-group restarts; -1 = no limit. Ray Train replaces a group that lost a worker or a "
        "node this many times, resuming from the last checkpoint; 0 = the first failure fails the run.",
    )


class TrackingConfig(_Component):
    """Where MLflow records the run, and the registered model that receives its weights."""

    uri: str = Field(
        default="",
        description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI, else a local sqlite store "
        "(mlruns/mlflow.db). sqlite:///path or http://HOST:PORT; MLflow 3 refuses the plain file store.",
    )
    experiment: str = Field(
        default="advtrain",
        min_length=1,
        description="MLflow experiment of the run (created if missing; a deleted one is refused).",
    )
    registered_model: str = Field(
        default="",
        description="Registry name; empty skips registering. The chosen epoch's weights (run.keep_best) become a "
        "new version, tagged with the threat model, method, epoch, weights_sha256 and accuracies.",
    )
    alias: str = Field(
        default="challenger",
        description="Alias moved to each newly registered version (empty: none). Not `champion`: only "
        "`advtrain promote` sets it, through its gates.",
    )

    @field_validator("registered_model")
    @classmethod
    def _safe_model_name(cls, value: str) -> str:
        # Checked before training: MLflow would refuse it only at registration, after the whole run.
        return value and checked_name(value, "tracking.registered_model")

    @field_validator("alias")
    @classmethod
    def _mlflow_alias(cls, value: str) -> str:
        return value and checked_alias(value, "tracking.alias")

    @model_validator(mode="after")
    def _not_champion(self) -> TrackingConfig:
        if self.alias == "champion":
            raise ValueError("tracking.alias cannot be 'champion': only `advtrain promote` sets it, through its gates")
        return self


class Config(_Component):
    """The whole run: one frozen component config per table of the TOML file.

    Rules across tables, checked at load: an adversarial method needs attack.eps > 0 (eps 0 only with
    method.name = standard); a method that names its attack needs it (fgsm_rs: attack.name = fgsm);
    attack.name = fgsm takes attack.num_steps = 1 and attack.num_restarts = 1; method.awp_gamma > 0 only
    with a method that takes weight perturbation (all but free_at)."""

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

        # Checked again here: configs built by model_copy skip the field validators.
        spec = METHODS[plugin_name("method.name", self.method.name)]
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
