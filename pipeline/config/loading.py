"""Reading runs: strict TOML loading, dotted overrides, the flat params view and TOML output.

Unknown tables and keys are refused with a suggestion before pydantic's terser message; pydantic's
errors are rewritten to name the dotted key and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config.base import ConfigError
from pipeline.config.components import Config


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
    if key.count(".") not in (1, 2):
        raise ConfigError(
            f"override key '{key}' must be table.key (e.g. attack.eps) or table.key.entry for a table value "
            "(e.g. model.kwargs.depth)"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    except RecursionError:
        raise ConfigError(f"override '{key}': the value is nested too deeply to be a config value") from None
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for table, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[{table}] must be a table of keys, got {values!r}")
    merged = {table: dict(values) for table, values in raw.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 2:
            merged.setdefault(parts[0], {})[parts[1]] = value
            continue
        if len(parts) != 3:
            raise ConfigError(f"override key '{key}' must be table.key, e.g. attack.eps")
        table, name, entry = parts
        inner = merged.setdefault(table, {}).get(name, {})
        if not isinstance(inner, dict) or name not in _TABLE_VALUED.get(table, ()):
            raise ConfigError(
                f"override key '{key}': {table}.{name} is not a table; table.key.entry is for "
                + ", ".join(f"{t}.{k}" for t, keys in _TABLE_VALUED.items() for k in keys)
            )
        merged[table][name] = {**inner, entry: value}
    return merged


# The keys whose value is itself a table, so `--set table.key.entry=value` sets one entry of it.
_TABLE_VALUED = {"model": ("kwargs", "normalize")}


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    raw = apply_overrides(raw, overrides or {})
    _check_keys(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a TOML run file and apply dotted overrides; raises ConfigError naming the bad key."""
    raw = read_toml(path, "config file", hint="the recipes live in jobs/configs/")
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read_toml(path: str | Path, what: str, *, hint: str = "") -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError naming the file: missing, not UTF-8 text, not TOML, or
    nested too deeply to parse (tomllib recurses per level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found" + (f"; {hint}" if hint else ""))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); give a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config (tables and arrays a few levels deep)") from None


def flat_params(config: Config) -> dict[str, Any]:
    """{"attack.eps": 0.2, ...}: the MLflow params view, same keys as overrides."""
    return {
        f"{table}.{key}": json.dumps(value) if isinstance(value, dict) else value
        for table, values in config.model_dump().items()
        for key, value in values.items()
    }


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
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else _toml_value(key)
