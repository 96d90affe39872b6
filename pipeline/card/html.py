"""Formatting for the model card: machine-checkable numbers, tables, badges and images."""

from __future__ import annotations

import math
from html import escape
from typing import Any

VERDICTS = ("passed", "suspect", "unchecked")


def num(key: str, value: int | float, text: str) -> str:
    """A report number: shown as `text`, its report path and exact value in data attributes."""
    exact = repr(int(value)) if isinstance(value, int) else repr(float(value))
    return f'<span class="num" data-key="{escape(key)}" data-value="{escape(exact)}">{escape(text)}</span>'


def pct(key: str, value: float | None) -> str:
    return "&mdash;" if value is None else num(key, value, f"{100 * value:.2f}%")


def plain(key: str, value: int | float | None) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, float) and math.isinf(value):
        return num(key, value, "\u221e" if value > 0 else "-\u221e")  # e.g. no adversarial found
    return num(key, value, str(value) if isinstance(value, int) else f"{value:.4g}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_fraction(name: str) -> bool:
    """Sanity numbers that are shares of examples (shown as %), by the names sanity.py gives them."""
    return any(word in name for word in ("accuracy", "after", "rate", "chance", "fraction", "change", "drop", "rise"))


def seconds_text(key: str, value: float) -> str:
    return num(key, value, f"{value:.3g} s")


def table(headers: list[str], rows: list[list[str]], *, classes: list[str] | None = None) -> str:
    """Cells are HTML already (escaped or spans); a cell starting with '<span class="num"' is right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="r">{c}</td>' if c.startswith('<span class="num"') else f"<td>{c}</td>" for c in row
        )
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def badge(verdict: str) -> str:
    return f'<span class="badge {verdict}">{verdict.upper()}</span>'


def pass_fail(passed: bool) -> str:
    return badge("passed") if passed else '<span class="badge suspect">FAIL</span>'


def image(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">' if uri else ""


def image_section(title: str, uri: str | None) -> str:
    return f"<h2>{escape(title)}</h2>\n{image(uri, title)}" if uri else ""
