"""What every config table shares: the error type, the strict frozen base model, and the plug-in names
the `name` keys are checked against (their registries)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict

from pipeline.errors import ConfigError

__all__ = ["PLUGIN_NAMES", "ConfigError", "plugin_name", "registered_name"]


class _Component(BaseModel):
    # strict: TOML already gives typed values, so "yes" must not become True nor 2.5 become 2. No inf or nan
    # anywhere: TOML has both literals, and an infinite eps or learning rate passes every lower bound.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def registered_name(value: str, names: Iterable[str], kind: str) -> str:
    """`value` if it is one of a registry's `names`, else a ValueError listing them (and the closest).
    Plug-in names are checked against their registry, never against a second list kept here."""
    names = list(names)
    if value in names:
        return value
    close = difflib.get_close_matches(value, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"'{value}' is not a registered {kind}.{hint} Allowed: {', '.join(names)}")


# The registries live with their plug-ins (attacks, methods, models), which import this package for their
# config types; hence the imports inside these functions.
def model_names() -> tuple[str, ...]:
    from pipeline.models import MODELS

    return tuple(MODELS)


def training_attack_names() -> tuple[str, ...]:
    from pipeline.attacks import TRAINING_ATTACKS

    return tuple(TRAINING_ATTACKS)


def method_names() -> tuple[str, ...]:
    from pipeline.methods import METHODS

    return tuple(METHODS)


# Dotted key -> (the registry's names, what they are): what the validators accept, and what the
# reference page lists as allowed.
PLUGIN_NAMES: dict[str, tuple[Callable[[], tuple[str, ...]], str]] = {
    "model.name": (model_names, "model"),
    "attack.name": (training_attack_names, "training attack"),
    "method.name": (method_names, "method"),
}


def plugin_name(key: str, value: str) -> str:
    """`value` if the registry behind the dotted `key` (a PLUGIN_NAMES entry) has it, else a ValueError."""
    names, kind = PLUGIN_NAMES[key]
    return registered_name(value, names(), kind)
