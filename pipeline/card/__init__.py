"""A model card for one evaluation: report.json and its plots as one readable, self-contained HTML page.

`write_card(out_dir, rep)` writes out_dir/card.html beside report.json. It shows, each only when the
report holds it: the model, data, threat model and protocol; clean and robust accuracy with the 95%
interval and the sanity verdict right beside the robust number (a SUSPECT number carries a red badge
and the rules that failed); accuracy after each attack; the minimal-norm and transfer attacks; every
sanity check with its rule and numbers and the accuracy-vs-eps plot; the adversarial examples; the
registered model's other versions (clean vs robust, this one highlighted); seconds per attack.

Why one file: MLflow's artifact viewer shows an HTML artifact in an iframe, where relative links to
the PNGs beside it do not resolve and a reviewer may be offline. So the CSS is inline, every image is
a `data:image/png;base64,` URI read from out_dir, and nothing is fetched.

Every number taken from the report is machine-checkable:
`<span class="num" data-key="DOTTED.PATH" data-value="repr(value)">shown</span>`, where DOTTED.PATH is
its path in the report (`robust_accuracy_ci95.0`, `sanity.checks.unbounded_attack.success_rate`); a
key that itself holds dots is matched whole (`seconds.attack.apgd_ce` is rep["seconds"]["attack.apgd_ce"]).
Numbers of the versions table come from `versions`, not the report: `versions.<i>.clean_acc` (an
integer index; the report's own "versions" holds package names only). data-value keeps the exact
value (`float(data_value) == value`); the text may round it or show it as a percentage.

Pure stdlib: no ray, no mlflow, no template engine (html.escape and f-strings).
"""

from __future__ import annotations

import base64
import datetime
import logging
from html import escape
from pathlib import Path
from typing import Any

from pipeline.card.html import image_section
from pipeline.card.sections import (
    attacks_section,
    header,
    headline,
    minimal_section,
    model_title,
    sanity_section,
    seconds_section,
    transfer_section,
    versions_section,
)

log = logging.getLogger(__name__)

CARD_FILE = "card.html"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


_IMAGES = ("accuracy_vs_eps.png", "examples.png", "minimal_curve.png")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  max-width: 960px; margin: 0 auto; padding: 24px; color: #1f2328; background: #fff; line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0 0 12px; }
h2 { font-size: 1.1rem; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
table.meta th { width: 150px; }
tr.current td { background: #fff8c5; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85em; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.75rem; font-weight: 700;
  color: #fff; vertical-align: middle; letter-spacing: 0.03em; }
.passed { background: #1a7f37; } .suspect { background: #cf222e; } .unchecked { background: #6e7781; }
.headline { display: flex; flex-wrap: wrap; gap: 40px; margin: 8px 0 4px; }
.metric .label { font-size: 0.85rem; color: #57606a; }
.metric .value { font-size: 2rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.metric.suspect-number .value { color: #cf222e; text-decoration: underline wavy #cf222e; }
.sub { color: #57606a; font-size: 0.9rem; }
.warn { border-left: 4px solid #cf222e; background: #fff1f0; padding: 8px 12px; margin: 8px 0; }
.warn ul { margin: 4px 0 0; padding-left: 20px; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; margin: 8px 0; }
"""


_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesLoaded = String(loaded.length);
});
"""


def write_card(out_dir: Path, rep: dict[str, Any], *, versions: list[dict[str, Any]] | None = None) -> Path:
    """Write out_dir/card.html for report `rep` (report.json's content) and return its path.

    Embeds accuracy_vs_eps.png, examples.png and minimal_curve.png from out_dir where present.
    `versions`: every version of the registered model (dicts with version, aliases, clean_acc,
    robust_acc, verdict, protocol, eps), shown as a table with rep["model"]["version"] highlighted."""
    out_dir = Path(out_dir)
    images = {name: uri for name in _IMAGES if (uri := _image_uri(out_dir / name)) is not None}
    date = rep.get("date") or _file_date(out_dir / "report.json")
    path = out_dir / CARD_FILE
    path.write_text(render_card(rep, images=images, versions=versions, date=date), encoding="utf-8")
    return path


def render_card(
    rep: dict[str, Any],
    *,
    images: dict[str, str],
    versions: list[dict[str, Any]] | None = None,
    date: str | None = None,
) -> str:
    """The card as one HTML string; `images`: file name -> data URI (only those present are shown)."""
    sections = [
        header(rep, date),
        headline(rep),
        attacks_section(rep),
        minimal_section(rep, images.get("minimal_curve.png")),
        transfer_section(rep),
        sanity_section(rep, images.get("accuracy_vs_eps.png")),
        image_section("Examples: clean (top) and adversarial (bottom)", images.get("examples.png")),
        versions_section(rep, versions),
        seconds_section(rep),
    ]
    title = f"Model card: {model_title(rep)}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body>\n</html>\n"
    )


def _image_uri(path: Path) -> str | None:
    """The PNG at `path` as a data URI; None if there is none (or it is not a PNG)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        log.warning("%s is not a PNG; left out of the model card", path)
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _file_date(path: Path) -> str | None:
    if not path.is_file():
        return None
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M UTC")
