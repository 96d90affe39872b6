"""The driver's model checks before anything starts: the architecture record for this dataset (a user
model imported, built and run once on two images), the user's code to ship to the workers, and
`model.init` resolved to a .safetensors file every worker reaches and checked key by key.

Every failure is a ConfigError naming the key, raised before Ray starts or anything is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, ModelConfig
from pipeline.errors import InputError
from pipeline.models import (
    architecture,
    build_model,
    check_architecture,
    check_outputs,
    is_import_path,
    load_pretrained,
)
from pipeline.models.user import located_code, pack_code

# Where a run's model.init weights are put when they come from MLflow: beside the runs, on storage every
# worker reaches; one file per run name.
INIT_FOLDER = ".advtrain-init"


@dataclass(frozen=True)
class ModelSetup:
    arch: dict[str, Any]
    # A user model's package (or module) zipped (pipeline.models.user.pack_code), sent to every worker,
    # which unpacks it before building the model; None for a built-in.
    code: dict[str, Any] | None
    init: str  # model.init as the workers read it: an absolute .safetensors path, or ""


def check_model(config: Config, info: data_lib.DatasetInfo, *, base: Path, storage: str, run_name: str) -> ModelSetup:
    """The model of `config` for the dataset `info`, checked: built (on the meta device for built-ins, for
    real and run once for user models), its code located, its model.init resolved and loaded."""
    user = is_import_path(config.model.name)
    arch, code = _record(config.model, info, base)
    init = _resolved_init(config, base=base, storage=storage, run_name=run_name)
    try:
        check_architecture(arch)
        if user or init:
            model = build_model(arch)
            check_outputs(model, shape=info.shape, num_classes=info.num_classes, name=config.model.name)
            if init:
                load_pretrained(model, init, arch=arch)
        else:
            with torch.device("meta"):  # no memory, no time: only whether it can be built for these images
                build_model(arch)
    except InputError as err:  # ModelError and TrackingError from the user's code or the init weights
        raise ConfigError(f"model.name {config.model.name!r} cannot train on {info.path}: {err}") from None
    except ValueError as err:  # the built-ins' own rules (wide_resnet's 6n+4 depth, small_cnn's side)
        raise ConfigError(f"model.name {config.model.name!r} cannot train on {info.path}: {err}") from None
    return ModelSetup(arch, pack_code(code) if code is not None else None, init)


def _record(model: ModelConfig, info: data_lib.DatasetInfo, base: Path) -> tuple[dict[str, Any], Path | None]:
    """The architecture record of `model` for the dataset, and a user model's code location (imported as the
    command line finds it) or None."""
    code = located_code(model.name, base) if is_import_path(model.name) else None
    arch = architecture(
        model,
        shape=info.shape,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        code=code.name if code else "",
    )
    return arch, code


def _resolved_init(config: Config, *, base: Path, storage: str, run_name: str) -> str:
    """model.init as an absolute .safetensors path: a file as given (resolved against `base`), or the
    weights of a models:/ or runs:/ URI written into the run storage (verified against the registry)."""
    init = config.model.init
    if not init:
        return ""
    if not init.startswith(("models:/", "runs:/")):
        path = Path(init) if Path(init).is_absolute() else (base / init).resolve()
        if not path.is_file():
            raise ConfigError(f"model.init {init!r}: no such file ({path}); give a .safetensors file or a model URI")
        return str(path)
    from pipeline.tracking import model_store
    from pipeline.tracking.runs import resolve_tracking_uri

    if "://" in storage and not storage.startswith("file://"):
        raise ConfigError(
            f"model.init {init!r} with run.storage_path {storage!r}: download the weights to a .safetensors file "
            "on storage every worker reaches and give its path"
        )
    resolved = model_store.resolve_model(init, tracking_uri=resolve_tracking_uri(config.tracking.uri, cwd=base))
    folder = Path(storage.removeprefix("file://")) / INIT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{run_name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in resolved.model.state_dict().items()}
    save_file(state, str(target))
    return str(target)


def external_model(
    name: str, weights: str | Path, info: data_lib.DatasetInfo, *, overrides: list[str], base: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model advtrain did not train: `name` (built-in or package.module:function, with model.* overrides
    such as model.kwargs.depth=3) for the dataset `info`, with the weights of a .safetensors file (the
    network's own keys or an advtrain model's). Returns the model in eval mode and its architecture record,
    weights_sha256 included."""
    from pipeline.config import config_from_dict, parse_override

    pairs = dict(parse_override(item) for item in overrides)
    other = [key for key in pairs if not key.startswith("model.")]
    if other:
        raise ConfigError(f"--set {other[0]}: only model.* keys describe a model to load (e.g. model.kwargs.depth=3)")
    config = config_from_dict({"model": {"name": name}}, pairs)
    weights = Path(weights) if Path(weights).is_absolute() else (base / weights).resolve()
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise InputError(f"--weights {weights}: expected an existing .safetensors file")
    arch, _code = _record(config.model, info, base)
    check_architecture(arch)
    model = build_model(arch)
    check_outputs(model, shape=info.shape, num_classes=info.num_classes, name=name)
    # Every key, the head's included: these weights are the model as it is to be evaluated.
    load_pretrained(model, weights, arch={**arch, "reset_head": ""})
    return model.eval(), {**arch, "weights_sha256": data_lib.sha256_file(weights)}
