"""The project's error types: what the CLI maps to a message and an exit code.

Every expected failure is an `InputError` (or one of its kinds below): bad input the user must fix,
exit code 2, with a one-paragraph message naming the file/key/value and what to change. A documented
refusal (a promotion gate failing) is exit code 1 and is not an exception. Anything else is a bug:
exit code 3, the traceback in a log file (pipeline/cli/__init__.py).
"""

from __future__ import annotations

import re


class InputError(ValueError):
    """Input that cannot be used; the message says what and what to change. CLI exit code 2."""


class ConfigError(InputError):
    """A run configuration that cannot be used; the message says which key and what to change."""


class DataError(InputError):
    """Data that cannot be used; the message names the file (and row) and what is wrong."""


class TrackingError(InputError):
    """A tracking/registry problem the user must fix (bad URI, missing model, wrong alias, ...)."""


class ModelError(InputError):
    """A model folder or registered model that cannot be loaded as it is (architecture, weights)."""


class WeightsChangedError(ModelError, TrackingError):
    """The weights' sha256 is not the one recorded: a model error, and (as callers of the registry
    always caught it) a tracking error."""


# One pattern for every name that becomes part of a path or of an MLflow filter string (run and search
# names, registered-model names): no separators, no quotes, no leading dot, so no '..' and no injection.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def checked_name(value: str, what: str) -> str:
    """`value` if it matches NAME_PATTERN, else an InputError that shows the rule."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InputError(f"{what} {value!r} is not allowed: names are {NAME_RULE} (e.g. digits-linf)")
    return value


# MLflow's own alias rules (mlflow/utils/validation.py), checked before anything is written: word
# characters and '-', at most 255, and never `latest` or `v<digits>`, which MLflow resolves as versions.
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}")
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)


def checked_alias(value: str, what: str = "alias") -> str:
    """`value` if MLflow accepts it as an alias and does not read it as a version, else an InputError."""
    if not isinstance(value, str) or not ALIAS_PATTERN.fullmatch(value):
        raise InputError(f"{what} {value!r} is not allowed: aliases are 1-255 characters from A-Z a-z 0-9 _ -")
    if RESERVED_ALIAS.fullmatch(value):
        raise InputError(
            f"{what} {value!r} is reserved by MLflow ('latest' and 'v<number>' name versions, not aliases); "
            "pick another, e.g. champion"
        )
    return value
