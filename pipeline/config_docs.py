"""The configuration reference page, generated from the config models: `python -m pipeline.config_docs`.

`render(Config)` is a pure function of the models: one section per TOML table with the model's docstring
and a row per key (dotted, as `--set` takes it), its type, default, allowed values (Literal choices,
ge/gt/le/lt bounds, the registry names the `name` validators accept) and its `description`. The command
writes it to docs/configuration.md (`make docs`); `--check` only compares and exits 1 when the page is
stale, which tests/unit/test_config_docs.py also checks. No ray, no mlflow.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import PLUGIN_NAMES, Config, _tables, _toml_value

COMMAND = "python -m pipeline.config_docs"
DEFAULT_OUT = "docs/configuration.md"

_INTRO = f"""\
# Configuration reference

Generated from the config models in `pipeline/config/` by `make docs` (`{COMMAND}`):
do not edit this page; change a field's `description` there and run `make docs`
(`tests/unit/test_config_docs.py` fails while the page is stale). Back to [command-line.md](command-line.md).

A run is one TOML file (the recipes are in `jobs/configs/`) with the tables below; every key has a
default, so any table or key may be left out. `--set table.key=value` overrides a key and is repeatable;
the value is a TOML literal and a bare word is a string (`--set attack.eps=0.1`,
`--set optim.lr_milestones=[50,75]`, `--set attack.norm=l2`). The same dotted keys are the MLflow params
of a run and the keys of a search space. Unknown tables or keys, wrong types (strict: `2.5` is not an
int, `"yes"` is not a bool) and values outside the allowed range are refused when the config is loaded,
with a message that names the key.
"""


def render(config: type[BaseModel] = Config) -> str:
    """The whole reference page (Markdown) for `config`, whose fields are the TOML tables."""
    tables = _tables(config)
    lines = [_INTRO, _docstring(config), ""]
    lines.append("Tables: " + " · ".join(f"[`[{table}]`](#{table})" for table in tables))
    for table, model in tables.items():
        lines += ["", f"## `[{table}]`", "", _docstring(model), ""]
        lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        lines += [_row(f"{table}.{name}", field) for name, field in model.model_fields.items()]
    return "\n".join(lines) + "\n"


def _docstring(model: type[BaseModel]) -> str:
    """The model's docstring as Markdown paragraphs (its line breaks are only the source's wrapping)."""
    paragraphs = inspect.cleandoc(model.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def _row(key: str, field: FieldInfo) -> str:
    cells = [f"`{key}`", _type_name(field.annotation), _default(field), _allowed(key, field), field.description]
    return "| " + " | ".join(_cell(cell or "") for cell in cells) + " |"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(sorted({type(value).__name__ for value in typing.get_args(annotation)}))
    if isinstance(annotation, types.GenericAlias):
        return str(annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    return f"`{_toml_value(field.get_default(call_default_factory=True))}`"


def _allowed(key: str, field: FieldInfo) -> str:
    if typing.get_origin(field.annotation) is typing.Literal:
        return ", ".join(f"`{value}`" for value in typing.get_args(field.annotation))
    if key in PLUGIN_NAMES:
        names, _kind = PLUGIN_NAMES[key]
        return ", ".join(f"`{name}`" for name in names())
    return _bounds(field.metadata)


def _bounds(metadata: Sequence[object]) -> str:
    """ge/gt/le/lt as `≥ 1`, `> 0`, `[0, 1)`, ...; min_length 1 as `non-empty`."""
    lower = upper = None  # (interval bracket, comparison, value)
    parts = []
    for item in metadata:
        match item:
            case annotated_types.Ge(ge=value):
                lower = ("[", "≥", value)
            case annotated_types.Gt(gt=value):
                lower = ("(", ">", value)
            case annotated_types.Le(le=value):
                upper = ("]", "≤", value)
            case annotated_types.Lt(lt=value):
                upper = (")", "<", value)
            case annotated_types.MinLen(min_length=1):
                parts.append("non-empty")
            case annotated_types.MinLen(min_length=value):
                parts.append(f"length ≥ {value}")
    if lower and upper:
        parts.insert(0, f"{lower[0]}{_number(lower[2])}, {_number(upper[2])}{upper[0]}")
    elif bound := lower or upper:
        parts.insert(0, f"{bound[1]} {_number(bound[2])}")
    return "; ".join(parts)


def _number(value: float) -> str:
    """1, 0.5, 65536, 4294967295: whole numbers in full (a seed's bound is not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page to `--out` (docs/configuration.md), or with `--check` exit 1 if it differs."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the page to write or check (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the page is stale")
    args = parser.parse_args(argv)
    out, page = Path(args.out), render()
    if args.check:
        if not out.is_file() or out.read_text() != page:
            print(f"{out} is stale: run `make docs` ({COMMAND}) and commit the result", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
