"""Typed run configuration: one frozen model per component, strict TOML loading, dotted overrides.

A run is a TOML file in jobs/configs/ with one table per component. Overrides use the same dotted
keys (`--set attack.eps=0.1`), and so do the MLflow params (`flat_params`) and Tune's search spaces.
Unknown keys, wrong types and impossible values fail at load time with a `ConfigError` that names the
key and says what is allowed.

- `base`: ConfigError, the strict frozen base model, the plug-in names (`PLUGIN_NAMES`)
- `adversarial`: the [attack], [method], [schedule] and [validation] tables
- `components`: the [run], [data], [model], [optim], [scaling] and [tracking] tables, and `Config`
- `loading`: TOML files, overrides, the flat params view, TOML output

Every field's `description` is its reference documentation: docs/configuration.md is generated from the
models by `python -m pipeline.config_docs` (`make docs`).
"""

from pipeline.config.adversarial import AttackConfig, MethodConfig, ScheduleConfig, ValidationConfig
from pipeline.config.base import PLUGIN_NAMES, ConfigError, _Component, plugin_name, registered_name
from pipeline.config.components import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    TrackingConfig,
)
from pipeline.config.loading import (
    _check_keys,
    _format_validation_error,
    _tables,
    _toml_value,
    _unknown,
    apply_overrides,
    config_from_dict,
    flat_params,
    load_config,
    parse_override,
    to_toml,
)

# The private names are re-exported for the modules that import them from here (orchestrate.tune uses
# _tables and _unknown to check search spaces against the run config's keys).
__all__ = [
    "PLUGIN_NAMES",
    "AttackConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScalingConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "ValidationConfig",
    "_Component",
    "_check_keys",
    "_format_validation_error",
    "_tables",
    "_toml_value",
    "_unknown",
    "apply_overrides",
    "config_from_dict",
    "flat_params",
    "load_config",
    "parse_override",
    "plugin_name",
    "registered_name",
    "to_toml",
]
