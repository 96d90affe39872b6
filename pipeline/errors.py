"""The project's error types: what the CLI maps to a message and an exit code.

Every expected failure is an `InputError` (or one of its kinds below): bad input the user must fix,
exit code 2, with a one-paragraph message naming the file/key/value and what to change. A documented
refusal (a promotion gate failing) is exit code 1 and is not an exception. Anything else is a bug:
exit code 3, the traceback in a log file (pipeline/cli.py).
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


# One pattern for every name that becomes part of a path or of an MLflow filter string (run and search
# names, registered-model names): no separators, no quotes, no leading dot, so no '..' and no injection.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def checked_name(value: str, what: str) -> str:
    """`value` if it matches NAME_PATTERN, else an InputError that shows the rule."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InputError(f"{what} {value!r} is not allowed: names are {NAME_RULE} (e.g. digits-linf)")
    return value
