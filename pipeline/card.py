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
import math
from html import escape
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_FILE = "card.html"
VERDICTS = ("passed", "suspect", "unchecked")
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

# Lets a test (or a curious reader) see that every embedded image decoded; harmless where scripts are
# blocked, as MLflow's sandboxed iframe may do.
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
        _header(rep, date),
        _headline(rep),
        _attacks_section(rep),
        _minimal_section(rep, images.get("minimal_curve.png")),
        _transfer_section(rep),
        _sanity_section(rep, images.get("accuracy_vs_eps.png")),
        _image_section("Examples: clean (top) and adversarial (bottom)", images.get("examples.png")),
        _versions_section(rep, versions),
        _seconds_section(rep),
    ]
    title = f"Model card: {_model_title(rep)}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body>\n</html>\n"
    )


# --- numbers -------------------------------------------------------------------------------------


def _num(key: str, value: int | float, text: str) -> str:
    """A report number: shown as `text`, its report path and exact value in data attributes."""
    exact = repr(int(value)) if isinstance(value, int) else repr(float(value))
    return f'<span class="num" data-key="{escape(key)}" data-value="{escape(exact)}">{escape(text)}</span>'


def _pct(key: str, value: float | None) -> str:
    return "&mdash;" if value is None else _num(key, value, f"{100 * value:.2f}%")


def _plain(key: str, value: int | float | None) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, float) and math.isinf(value):
        return _num(key, value, "\u221e" if value > 0 else "-\u221e")  # e.g. no adversarial found
    return _num(key, value, str(value) if isinstance(value, int) else f"{value:.4g}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_fraction(name: str) -> bool:
    """Sanity numbers that are shares of examples (shown as %), by the names sanity.py gives them."""
    return any(word in name for word in ("accuracy", "after", "rate", "chance", "fraction", "change", "drop", "rise"))


def _seconds(key: str, value: float) -> str:
    return _num(key, value, f"{value:.3g} s")


# --- building blocks -----------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]], *, classes: list[str] | None = None) -> str:
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


def _badge(verdict: str) -> str:
    return f'<span class="badge {verdict}">{verdict.upper()}</span>'


def _pass_fail(passed: bool) -> str:
    return _badge("passed") if passed else '<span class="badge suspect">FAIL</span>'


def _image(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">' if uri else ""


def _image_section(title: str, uri: str | None) -> str:
    return f"<h2>{escape(title)}</h2>\n{_image(uri, title)}" if uri else ""


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


# --- verdict -------------------------------------------------------------------------------------


def _verdict(rep: dict[str, Any]) -> str:
    """rep["verdict"], else from rep["suspect"]: True -> suspect, False -> passed, None -> unchecked."""
    value = rep.get("verdict")
    if value is None:
        suspect = rep.get("suspect")
        value = "unchecked" if suspect is None else ("suspect" if suspect else "passed")
    if value not in VERDICTS:
        raise ValueError(f"report verdict {value!r}: use one of {', '.join(VERDICTS)}")
    return value


def _failed_rules(rep: dict[str, Any]) -> list[str]:
    """What made the number suspect: failed sanity checks, a failed transfer check, minimal-norm disagreement."""
    failed = [
        f"<code>{escape(name)}</code>: {escape(str(check.get('rule', '')))}"
        for name, check in ((rep.get("sanity") or {}).get("checks") or {}).items()
        if not check.get("passed", True)
    ]
    transfer = rep.get("transfer") or {}
    if transfer and transfer.get("passed") is False:
        failed.append("<code>transfer</code>: attacks transferred from a surrogate beat the white-box ensemble")
    if (rep.get("minimal") or {}).get("disagrees"):
        failed.append("<code>minimal</code>: minimal-norm attacks disagree with the protocol's robust accuracy")
    return failed


# --- sections ------------------------------------------------------------------------------------


def _model_title(rep: dict[str, Any]) -> str:
    model = rep.get("model") or {}
    name = model.get("name") or model.get("uri") or "model"
    return f"{name} v{model['version']}" if model.get("version") else str(name)


def _header(rep: dict[str, Any], date: str | None) -> str:
    model, data = rep.get("model") or {}, rep.get("data") or {}
    rows: list[tuple[str, str]] = []
    if model:
        rows.append(("Model", escape(_model_title(rep))))
        rows += [(label, _field(f"model.{k}", model[k])) for k, label in _MODEL_FIELDS if model.get(k)]
        if model.get("weights_sha256"):
            sha = escape(str(model["weights_sha256"]))
            rows.append(("Weights sha256", f'<code title="{sha}">{sha[:12]}&hellip;</code>'))
    if data:
        rows.append(("Data", ", ".join(f"{escape(str(k))}: {_field(f'data.{k}', v)}" for k, v in data.items())))
    if threat := rep.get("threat_model"):
        eps = _plain("threat_model.eps", threat.get("eps"))
        rows.append(("Threat model", f"{escape(str(threat.get('norm', '?')))}, eps = {eps}"))
    if protocol := rep.get("protocol"):
        rows.append(("Protocol", _protocol_text(protocol)))
    if date:
        rows.append(("Date", escape(date)))
    if packages := rep.get("versions"):
        rows.append(("Versions", ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in packages.items())))
    meta = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<h1>Model card: {escape(_model_title(rep))}</h1>\n<table class="meta">{meta}</table>'


_MODEL_FIELDS = (("uri", "URI"), ("architecture", "Architecture"), ("run_id", "MLflow run"))


def _field(key: str, value: Any) -> str:
    """A free-form report value: a number keeps its data-key, anything else is escaped text."""
    return _plain(key, value) if _is_number(value) else f"<code>{escape(str(value))}</code>"


def _protocol_text(protocol: dict[str, Any]) -> str:
    attacks = ", ".join(escape(str(a.get("name"))) for a in protocol.get("attacks", []))
    parts = [f"<code>{escape(str(protocol.get('name', '?')))}</code>" + (f" ({attacks})" if attacks else "")]
    if "num_examples" in protocol:
        parts.append(f"{_plain('protocol.num_examples', protocol['num_examples'])} examples")
    if "seed" in protocol:
        parts.append(f"seed {_plain('protocol.seed', protocol['seed'])}")
    return ", ".join(parts)


def _headline(rep: dict[str, Any]) -> str:
    if "robust_accuracy" not in rep:
        return ""
    state = _verdict(rep)
    clean = _metric("Clean accuracy", _pct("clean_accuracy", rep.get("clean_accuracy")), "")
    interval = ""
    if ci := rep.get("robust_accuracy_ci95"):
        interval = f"95% CI {_pct('robust_accuracy_ci95.0', ci[0])} &ndash; {_pct('robust_accuracy_ci95.1', ci[1])}"
    robust_value = f"{_pct('robust_accuracy', rep['robust_accuracy'])} {_badge(state)}"
    robust = _metric("Robust accuracy", robust_value, interval, suspect=state == "suspect")
    notes = []
    if rep.get("robust_accuracy_protocol") is not None:
        alone = _pct("robust_accuracy_protocol", rep["robust_accuracy_protocol"])
        notes.append(f"The protocol's attacks alone, before the extra attacks: {alone}.")
    if extra := rep.get("broken_by_extra"):
        counts = ", ".join(f"{escape(k)} {_plain(f'broken_by_extra.{k}', v)}" for k, v in extra.items())
        notes.append(f"Examples broken only by the extra attacks: {counts}.")
    notes.append(_verdict_text(state))
    body = f'<div class="headline">{clean}{robust}</div>\n' + "".join(f'<p class="sub">{n}</p>' for n in notes)
    if state == "suspect":
        rules = "".join(f"<li>{rule}</li>" for rule in _failed_rules(rep)) or "<li>(no rule recorded)</li>"
        body += f'\n<div class="warn"><strong>SUSPECT robust accuracy</strong>: failed<ul>{rules}</ul></div>'
    return "<h2>Headline</h2>\n" + body


def _metric(label: str, value: str, sub: str, *, suspect: bool = False) -> str:
    css = "metric suspect-number" if suspect else "metric"
    return (
        f'<div class="{css}"><div class="label">{escape(label)}</div><div class="value">{value}</div>'
        f'<div class="sub">{sub}</div></div>'
    )


def _verdict_text(state: str) -> str:
    return {
        "passed": f"Verdict {_badge('passed')}: every sanity check passed.",
        "suspect": f"Verdict {_badge('suspect')}: the robust number is likely an artefact of weak attacks or masking.",
        "unchecked": f"Verdict {_badge('unchecked')}: no sanity checks ran for this evaluation.",
    }[state]


def _attacks_section(rep: dict[str, Any]) -> str:
    after = rep.get("accuracy_after_each_attack")
    if not after:
        return ""
    rows = [[f"<code>{escape(n)}</code>", _pct(f"accuracy_after_each_attack.{n}", a)] for n, a in after.items()]
    note = '<p class="sub">Cumulative: an example counts as robust only if no attack so far fooled it.</p>'
    return "<h2>Accuracy after each attack</h2>\n" + note + _table(["attack", "robust accuracy"], rows)


def _minimal_section(rep: dict[str, Any], curve_uri: str | None) -> str:
    minimal = rep.get("minimal")
    if not minimal:
        return ""
    norm = escape(str(minimal.get("norm", "")))
    rows = [
        [f"median {norm} norm (&infin;: none found)", _plain("minimal.median_norm", minimal.get("median_norm"))],
        [f"mean {norm} norm of those found", _plain("minimal.mean_norm", minimal.get("mean_norm"))],
    ]
    if "not_found" in minimal:
        rows.append(["examples with none found", _plain("minimal.not_found", minimal["not_found"])])
    if "accuracy_at_eps" in minimal:
        rows.append(["accuracy at the evaluation eps", _pct("minimal.accuracy_at_eps", minimal["accuracy_at_eps"])])
    if "fixed_eps_accuracy" in minimal:
        rows.append(
            ["the fixed-eps cascade at that eps", _pct("minimal.fixed_eps_accuracy", minimal["fixed_eps_accuracy"])]
        )
    rows += [
        [f"median, <code>{escape(n)}</code>", _plain(f"minimal.per_attack_median.{n}", v)]
        for n, v in (minimal.get("per_attack_median") or {}).items()
    ]
    parts = ["<h2>Minimal-norm adversarials</h2>", _attack_names(minimal, "The smallest perturbation per example over")]
    if minimal.get("disagrees"):
        parts.append(
            '<div class="warn"><strong>Disagreement</strong>: the minimal-norm attacks and the fixed-eps cascade '
            "give different robust accuracies at this eps; at least one of them is too weak here.</div>"
        )
    parts += [_table(["", "value"], rows), _image(curve_uri, "accuracy vs perturbation norm")]
    parts.append(_curve_table(minimal.get("curve") or []))
    return "\n".join(p for p in parts if p)


def _attack_names(block: dict[str, Any], lead: str) -> str:
    names = [escape(str(a.get("name"))) for a in block.get("attacks") or [] if isinstance(a, dict)]
    return f'<p class="sub">{lead}: {", ".join(f"<code>{n}</code>" for n in names)}.</p>' if names else ""


def _curve_table(curve: list[dict[str, float]], *, num_points: int = 6) -> str:
    """A few points of the accuracy-vs-norm curve, evenly spaced, first and last included."""
    if not curve:
        return ""
    n = len(curve)
    picked = sorted({round(i * (n - 1) / max(num_points - 1, 1)) for i in range(min(num_points, n))})
    rows = [
        [_plain(f"minimal.curve.{i}.eps", curve[i]["eps"]), _pct(f"minimal.curve.{i}.accuracy", curve[i]["accuracy"])]
        for i in picked
    ]
    return _table(["eps", "accuracy"], rows)


def _transfer_section(rep: dict[str, Any]) -> str:
    transfer = rep.get("transfer")
    if not transfer:
        return ""
    after = transfer.get("accuracy_after_each_attack") or {}
    rows = [
        [f"<code>{escape(n)}</code>", _pct(f"transfer.accuracy_after_each_attack.{n}", a)] for n, a in after.items()
    ]
    if "accuracy" in transfer:
        rows.append(["<strong>worst case over them</strong>", _pct("transfer.accuracy", transfer["accuracy"])])
    surrogate = f"<code>{escape(str(transfer.get('surrogate', '?')))}</code>"
    check = f" {_pass_fail(bool(transfer['passed']))}" if transfer.get("passed") is not None else ""
    return (
        f"<h2>Transfer attacks{check}</h2>\n"
        f'<p class="sub">Adversarials crafted on the surrogate {surrogate}, scored on this model. A model whose '
        "gradients are masked falls to these more than to its own white-box attacks.</p>\n"
        + _table(["attack (on the surrogate)", "accuracy of this model"], rows)
    )


def _sanity_section(rep: dict[str, Any], curve_uri: str | None) -> str:
    sanity = rep.get("sanity")
    if not sanity and not curve_uri:
        return ""
    parts = ["<h2>Sanity checks</h2>"]
    if sanity:
        if "num_examples" in sanity:
            parts.append(
                f'<p class="sub">On the first {_plain("sanity.num_examples", sanity["num_examples"])} examples.</p>'
            )
        rows = [_check_row(name, check) for name, check in (sanity.get("checks") or {}).items()]
        parts.append(_table(["check", "result", "rule", "numbers"], rows))
    parts.append(_image(curve_uri, "robust accuracy vs eps"))
    return "\n".join(p for p in parts if p)


def _check_row(name: str, check: dict[str, Any]) -> list[str]:
    numbers = []
    for key, value in check.items():
        if key == "passed" or not _is_number(value):
            continue  # lists such as the eps curve are in the plot below
        path = f"sanity.checks.{name}.{key}"
        shown = _pct(path, value) if _is_fraction(key) and isinstance(value, float) else _plain(path, value)
        numbers.append(f"{escape(key)} {shown}")
    return [
        f"<code>{escape(name)}</code>",
        _pass_fail(bool(check.get("passed"))),
        escape(str(check.get("rule", ""))),
        "<br>".join(numbers),
    ]


def _versions_section(rep: dict[str, Any], versions: list[dict[str, Any]] | None) -> str:
    if not versions:
        return ""
    current = str((rep.get("model") or {}).get("version"))
    rows, classes = [], []
    for i, v in enumerate(versions):
        this = str(v.get("version")) == current
        aliases = " ".join(f"@{escape(a)}" for a in v.get("aliases") or [])
        label = f"<strong>{escape(str(v.get('version')))}</strong> {aliases}" + (" (this card)" if this else "")
        robust = _pct(f"versions.{i}.robust_acc", v.get("robust_acc"))
        if v.get("verdict") == "suspect":
            robust += " " + _badge("suspect")
        eps = _plain(f"versions.{i}.eps", v.get("eps"))
        protocol = escape(str(v["protocol"])) if v.get("protocol") else "&mdash;"
        verdict_cell = _badge(v["verdict"]) if v.get("verdict") in VERDICTS else "&mdash;"
        rows.append([label, protocol, eps, _pct(f"versions.{i}.clean_acc", v.get("clean_acc")), robust, verdict_cell])
        classes.append("current" if this else "")
    headers = ["version", "protocol", "eps", "clean accuracy", "robust accuracy", "verdict"]
    return "<h2>Versions of this model</h2>\n" + _table(headers, rows, classes=classes)


def _seconds_section(rep: dict[str, Any]) -> str:
    seconds = rep.get("seconds")
    if not seconds:
        return ""
    rows = [[escape(name), _seconds(f"seconds.{name}", value)] for name, value in seconds.items() if _is_number(value)]
    return "<h2>Time</h2>\n" + _table(["", "seconds"], rows)
