"""The run's other tables (identity, data, network, optimizer, resources, tracking) and `Config`, the
whole run. Every field's `description` is its reference documentation: docs/configuration.md is generated
from it (`python -m pipeline.config_docs`), so it says what the key does, its unit, what 0 means and the
paper it implements."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

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


# package.module:function (Python identifiers); a module path inside a network (`fc`, `classifier.5`).
_IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_INIT_URI = re.compile(
    r"(models:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9_.-]{1,255}|/[0-9]{1,9})|runs:/[0-9A-Za-z]{1,64}/model)"
)
MAX_KWARGS_JSON = 16 * 1024


class NormalizeConfig(_Component):
    """Per-channel (x - mean) / std in front of the network; empty lists: none."""

    mean: list[float] = Field(default=[], max_length=64, description="Per-channel mean, pixel space [0,1].")
    std: list[float] = Field(default=[], max_length=64, description="Per-channel std (> 0), pixel space [0,1].")

    @model_validator(mode="after")
    def _paired(self) -> NormalizeConfig:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel each; got {len(self.mean)} and {len(self.std)}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


class ModelConfig(_Component):
    """The network: a built-in architecture or the user's own `package.module:function`, behind an optional
    normalisation layer, so it takes pixels in [0,1]. Its architecture record (name, settings, shape,
    classes) is stored beside the weights; a user model's code is shipped and logged with it."""

    name: str = Field(
        default="small_cnn",
        description="A built-in architecture (pipeline.models.MODELS): small_cnn (two conv blocks + MLP, the "
        "TRADES MNIST net scaled; square images with a side divisible by 4), preact_resnet18 (PreAct "
        "ResNet-18, He et al. 2016, the net of Wong et al. 2020 and Rice et al. 2020), wide_resnet "
        "(WRN-depth-width, Zagoruyko & Komodakis 2016); or an import path `package.module:function` of the "
        "user's code, called with model.kwargs, returning a torch.nn.Module that takes (N,C,H,W) images. Its "
        "package (or single-file module) is shipped to the Ray workers and logged with every registered "
        "version, so the model rebuilds anywhere without pickle. Run from the folder that holds the package, "
        "or put it on PYTHONPATH.",
    )
    kwargs: dict[str, Any] = Field(
        default={},
        description="User models only: keyword arguments of the model function (a TOML table; JSON-able values; "
        "override one with `--set model.kwargs.NAME=VALUE`).",
    )
    normalize: NormalizeConfig = Field(
        default=NormalizeConfig(),
        description="`{ mean = [...], std = [...] }`: (x - mean) / std per channel in front of the network, for "
        "a network trained on normalised inputs; the model still takes pixels in [0,1]. Empty: built-ins use the "
        "train split's statistics, user models get no normalisation (the network takes [0,1] pixels).",
    )
    output: int | str = Field(
        default="",
        description="User models only: which part of the network's output holds the logits, an index into a "
        "tuple/list output or a key of a dict output. Empty: the output is the logits tensor itself.",
    )
    init: str = Field(
        default="",
        description="Pretrained weights to start from: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model "
        "or a .safetensors file (an advtrain model's or the network's own state_dict). Every key must match the "
        "network exactly (a mismatch lists missing and unexpected keys and shape mismatches), except the layer "
        "model.reset_head replaces. Ignored when the run resumes from its own checkpoint. Empty: random init.",
    )
    reset_head: str = Field(
        default="",
        max_length=200,
        description="Module path of the network's final nn.Linear (e.g. `fc`, `classifier.5` for small_cnn, "
        "`linear` for the ResNets): replaced by a fresh layer with the dataset's number of classes (fine-tuning "
        "on new classes; the layer's weights in model.init are skipped). Recorded with the model, so loading "
        "rebuilds the same network. Empty: keep the network as built.",
    )
    width: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Built-ins: width multiplier: channels times this for small_cnn (32/64 conv channels, 200 "
        "hidden) and preact_resnet18 (64 base channels); wide_resnet's k (10 for WRN-34-10). Compute grows about "
        "as its square.",
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
        description="Built-ins: nonlinearity; silu/gelu are smooth (Xie et al. 2020, arXiv:2006.14536), same "
        "weights and cost. Measured here (FGSM-RS, Fashion-MNIST, small_cnn) SiLU was 5.6 points below ReLU in "
        "robust accuracy, so the recipes keep relu.",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        if ":" in value:
            if not _IMPORT_PATH.fullmatch(value) or len(value) > 200:
                raise ValueError(
                    f"{value!r} is not an import path: expected package.module:function (Python identifiers)"
                )
            return value
        return plugin_name("model.name", value)

    @field_validator("kwargs")
    @classmethod
    def _json_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"values must be strings, numbers, booleans, arrays or tables ({err})") from None
        if len(text) > MAX_KWARGS_JSON:
            raise ValueError(f"{len(text)} bytes as JSON; keep model.kwargs under {MAX_KWARGS_JSON}")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: int | str) -> int | str:
        if (isinstance(value, int) and not 0 <= value < 1000) or (isinstance(value, str) and len(value) > 128):
            raise ValueError("expected an index 0-999, a dict key (up to 128 characters) or empty")
        return value

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value and value.startswith(("models:/", "runs:/")) and not _INIT_URI.fullmatch(value):
            raise ValueError(f"{value!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
        if value and not value.startswith(("models:/", "runs:/")) and not value.endswith(".safetensors"):
            raise ValueError(f"{value!r}: expected a .safetensors file or a models:/ or runs:/ URI")
        return value

    @field_validator("reset_head")
    @classmethod
    def _head(cls, value: str) -> str:
        if value and not _MODULE_PATH.fullmatch(value):
            raise ValueError(f"{value!r} is not a module path such as fc or classifier.5")
        return value

    @model_validator(mode="after")
    def _user_only(self) -> ModelConfig:
        user = ":" in self.name
        if not user and (self.kwargs or self.output != ""):
            raise ValueError(
                f"model.kwargs and model.output are for user models (package.module:function); the built-in "
                f"{self.name!r} takes width, depth and activation"
            )
        return self


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
    backbone_lr_scale: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Fine-tuning: optim.lr times this for every parameter outside model.reset_head's new layer "
        "(which learns at optim.lr), e.g. 0.1 to move pretrained features less than the fresh head. Needs "
        "model.reset_head when below 1.",
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
    sync_batchnorm: bool = Field(
        default=False,
        description="BatchNorm statistics over the global batch (torch SyncBatchNorm) instead of each GPU's "
        "shard: for small per-GPU batches. GPU workers only (use_gpu = true). Its training forwards all-reduce, "
        "so attacks must run in eval mode (method.attack_mode = 'eval', the default): each rank's attack takes "
        "its own number of forwards.",
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
    system_metrics_interval_s: float = Field(
        default=10.0,
        ge=0.0,
        le=3_600.0,
        description="Seconds between MLflow system-metric samples of rank 0's node (system/cpu_utilization_percentage, "
        "system/gpu_0_utilization_percentage, system/gpu_0_memory_usage_megabytes, ...); 0 turns them off.",
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
        if self.scaling.sync_batchnorm and not self.scaling.use_gpu:
            raise ValueError(
                "scaling.sync_batchnorm = true needs GPU workers (torch's SyncBatchNorm syncs CUDA tensors only): set "
                "scaling.use_gpu = true, or scaling.sync_batchnorm = false"
            )
        if self.scaling.sync_batchnorm and self.method.attack_mode == "train":
            raise ValueError(
                "scaling.sync_batchnorm = true with method.attack_mode = 'train': a train-mode attack forward "
                "all-reduces BatchNorm statistics, and ranks take different numbers of attack steps (a hang). "
                "Set method.attack_mode = 'eval'"
            )
        if self.optim.backbone_lr_scale < 1.0 and not self.model.reset_head:
            raise ValueError(
                "optim.backbone_lr_scale < 1 scales every parameter but the new head's: set model.reset_head to "
                "the network's final linear layer (e.g. 'fc'), or optim.backbone_lr_scale = 1"
            )
        return self
