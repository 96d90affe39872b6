"""The search file: its schema and validation, checked against the run config it varies.

Pure: no ray, no mlflow, so a bad search file is refused in milliseconds, before any trial starts.
`pipeline.orchestrate.tune` turns a validated `Search` into Tune's param space and runs it.

The search file (jobs/configs/search_*.toml):

    [search]                      # all optional
    num_samples = 8               # trials (x the grid's size when the space has grid entries)
    algorithm = "random"          # random | grid | optuna
    clean_weight = 0.0            # objective = val robust acc + clean_weight * val clean acc
    max_concurrent_trials = 0     # 0 = as many as the cluster's CPUs/GPUs fit without waiting
    seed = 0
    register_best = false         # register the best completed trial's model (tracking.registered_model)

    [asha]
    enabled = true
    grace_period = 1              # epochs every trial runs before it can be stopped
    reduction_factor = 2

    [space]
    "attack.eps" = { choice = [0.1, 0.15] }
    "schedule.eps_ramp_epochs" = { randint = [0, 5] }     # inclusive bounds
    "optim.lr" = { loguniform = [1e-4, 1e-2] }
    "method.name" = { grid = ["pgd_at", "trades"] }
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import Config, ConfigError, _tables, _unknown, config_from_dict
from pipeline.config.loading import read_toml

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a search may not vary: they must be equal across trials for the objective to compare trials
# (validation), or they are the search's own business (names, storage, resources, tracking).
FIXED_KEYS = ("run.name", "run.epochs", "run.storage_path", "data.path", "data.loader", "data.memory_limit_mb")
FIXED_TABLES = ("validation", "scaling", "tracking")


class _Strict(BaseModel):
    # As the run config: no inf or nan, and bounds a real search stays far inside.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class SearchSettings(_Strict):
    num_samples: int = Field(default=8, ge=1, le=100_000)
    algorithm: Literal["random", "grid", "optuna"] = "random"
    clean_weight: float = Field(default=0.0, ge=0.0, le=100.0)
    max_concurrent_trials: int = Field(default=0, ge=0, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    register_best: bool = False


class AshaSettings(_Strict):
    enabled: bool = True
    grace_period: int = Field(default=1, ge=1, le=100_000)
    reduction_factor: float = Field(default=2.0, gt=1.0, le=100.0)


@dataclass(frozen=True)
class Search:
    """A validated search file: settings plus the space (dotted key -> (distribution, arguments))."""

    settings: SearchSettings
    asha: AshaSettings
    space: dict[str, tuple[str, list[Any]]]
    text: str = ""


def load_search(path: str | Path, base: Config, *, num_samples: int | None = None) -> Search:
    """Read and check a search file against the run config it varies; raises ConfigError naming the
    problem (unknown key, empty choice, low > high, a value the run config refuses) before any trial."""
    path = Path(path)
    raw = read_toml(path, "search file", hint="examples live in jobs/configs/search_*.toml")
    try:
        return parse_search(raw, base, num_samples=num_samples, text=path.read_text())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_search(raw: dict[str, Any], base: Config, *, num_samples: int | None = None, text: str = "") -> Search:
    """`load_search` on an already parsed TOML document; `text` is kept to log the file as is."""
    for table in raw:
        if table not in ("search", "asha", "space"):
            raise ConfigError(_unknown(table, ["search", "asha", "space"], "table"))
    try:
        settings = SearchSettings.model_validate(raw.get("search", {}))
        asha = AshaSettings.model_validate(raw.get("asha", {}))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"[search]/[asha]: {problems}") from None
    if num_samples is not None:
        if num_samples < 1:
            raise ConfigError("--num-samples must be at least 1")
        settings = settings.model_copy(update={"num_samples": num_samples})
    space = _flatten_space(raw.get("space", {}))
    if not space:
        raise ConfigError(
            '[space] is empty: give at least one key to search, e.g. "attack.eps" = { choice = [0.1, 0.2] }'
        )
    checked = {key: _check_entry(key, entry, base) for key, entry in space.items()}
    if settings.algorithm == "optuna" and any(d == "grid" for d, _ in checked.values()):
        raise ConfigError("algorithm 'optuna' cannot take grid entries; use choice instead")
    return Search(settings=settings, asha=asha, space=checked, text=text)


def _flatten_space(space: Any) -> dict[str, Any]:
    """[space] as "table.key" = {...} entries, or nested [space.table] key = {...} tables."""
    if not isinstance(space, dict):
        raise ConfigError("[space] must be a table of keys")
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) and "." not in key:
            for inner, entry in value.items():
                flat[f"{key}.{inner}"] = entry
        else:
            flat[key] = value
    return flat


def _check_entry(key: str, entry: Any, base: Config) -> tuple[str, list[Any]]:
    tables = _tables(Config)
    if key.count(".") != 1:
        raise ConfigError(f"space key '{key}' must be table.key, e.g. attack.eps")
    table, name = key.split(".")
    if table not in tables:
        raise ConfigError(_unknown(key, [f"{t}.{k}" for t in tables for k in tables[t].model_fields]))
    if name not in tables[table].model_fields:
        raise ConfigError(_unknown(key, [f"{table}.{k}" for k in tables[table].model_fields]))
    if key in FIXED_KEYS or table in FIXED_TABLES:
        raise ConfigError(
            f"space key '{key}' cannot be searched: it must be the same for every trial "
            "(set it in the run config instead)"
        )
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            f"space.{key} must be one distribution, e.g. {{ choice = [...] }}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    ((dist, args),) = entry.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(_unknown(f"{dist}", list(DISTRIBUTIONS), f"distribution (space.{key})"))
    if not isinstance(args, list):
        raise ConfigError(f"space.{key}.{dist} must be a list, got {args!r}")
    if dist in ("choice", "grid"):
        if not args:
            raise ConfigError(f"space.{key}.{dist} is empty: give at least one value")
        values = args
    else:
        if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"space.{key}.{dist} must be [low, high] numbers, got {args!r}")
        low, high = args
        if low > high:
            raise ConfigError(f"space.{key}.{dist}: low {low} > high {high}")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"space.{key}.loguniform needs low > 0, got {low}")
        if dist == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"space.{key}.randint needs integer bounds, got {args!r}")
        values = [low, high]
    for value in values:
        try:
            config_from_dict(base.model_dump(), {key: value})
        except ConfigError as err:
            raise ConfigError(f"space.{key}: value {value!r} is refused by the run config: {err}") from None
    return dist, list(args)
