"""The model card's sections, each from the report (an empty string where the report lacks it)."""

from __future__ import annotations

from html import escape
from typing import Any

from pipeline.card.html import (
    VERDICTS,
    badge,
    image,
    is_fraction,
    is_number,
    pass_fail,
    pct,
    plain,
    seconds_text,
    table,
)


def verdict(rep: dict[str, Any]) -> str:
    """rep["verdict"], else from rep["suspect"]: True -> suspect, False -> passed, None -> unchecked."""
    value = rep.get("verdict")
    if value is None:
        suspect = rep.get("suspect")
        value = "unchecked" if suspect is None else ("suspect" if suspect else "passed")
    if value not in VERDICTS:
        raise ValueError(f"report verdict {value!r}: use one of {', '.join(VERDICTS)}")
    return value


def failed_rules(rep: dict[str, Any]) -> list[str]:
    """What made the number suspect: failed sanity checks, a failed transfer check, minimal-norm disagreement."""
    failed = [
        f"<code>{escape(name)}</code>: {escape(str(check.get('rule', '')))}"
        for name, check in ((rep.get("sanity") or {}).get("checks") or {}).items()
        if not check.get("passed", True)
    ]
    return failed


def model_title(rep: dict[str, Any]) -> str:
    model = rep.get("model") or {}
    name = model.get("name") or model.get("uri") or "model"
    return f"{name} v{model['version']}" if model.get("version") else str(name)


def header(rep: dict[str, Any], date: str | None) -> str:
    model, data = rep.get("model") or {}, rep.get("data") or {}
    rows: list[tuple[str, str]] = []
    if model:
        rows.append(("Model", escape(model_title(rep))))
        rows += [(label, field(f"model.{k}", model[k])) for k, label in MODEL_FIELDS if model.get(k)]
        if model.get("weights_sha256"):
            sha = escape(str(model["weights_sha256"]))
            rows.append(("Weights sha256", f'<code title="{sha}">{sha[:12]}&hellip;</code>'))
    if data:
        rows.append(("Data", ", ".join(f"{escape(str(k))}: {field(f'data.{k}', v)}" for k, v in data.items())))
    if threat := rep.get("threat_model"):
        eps = plain("threat_model.eps", threat.get("eps"))
        rows.append(("Threat model", f"{escape(str(threat.get('norm', '?')))}, eps = {eps}"))
    if protocol := rep.get("protocol"):
        rows.append(("Protocol", protocol_text(protocol)))
    if date:
        rows.append(("Date", escape(date)))
    if packages := rep.get("versions"):
        rows.append(("Versions", ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in packages.items())))
    meta = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return f'<h1>Model card: {escape(model_title(rep))}</h1>\n<table class="meta">{meta}</table>'


MODEL_FIELDS = (("uri", "URI"), ("architecture", "Architecture"), ("run_id", "MLflow run"))


def field(key: str, value: Any) -> str:
    """A free-form report value: a number keeps its data-key, anything else is escaped text."""
    return plain(key, value) if is_number(value) else f"<code>{escape(str(value))}</code>"


def protocol_text(protocol: dict[str, Any]) -> str:
    attacks = ", ".join(escape(str(a.get("name"))) for a in protocol.get("attacks", []))
    parts = [f"<code>{escape(str(protocol.get('name', '?')))}</code>" + (f" ({attacks})" if attacks else "")]
    if "num_examples" in protocol:
        parts.append(f"{plain('protocol.num_examples', protocol['num_examples'])} examples")
    if "seed" in protocol:
        parts.append(f"seed {plain('protocol.seed', protocol['seed'])}")
    return ", ".join(parts)


def headline(rep: dict[str, Any]) -> str:
    if "robust_accuracy" not in rep:
        return ""
    state = verdict(rep)
    clean = metric("Clean accuracy", pct("clean_accuracy", rep.get("clean_accuracy")), "")
    interval = ""
    if ci := rep.get("robust_accuracy_ci95"):
        interval = f"95% CI {pct('robust_accuracy_ci95.0', ci[0])} &ndash; {pct('robust_accuracy_ci95.1', ci[1])}"
    robust_value = f"{pct('robust_accuracy', rep['robust_accuracy'])} {badge(state)}"
    robust = metric("Robust accuracy", robust_value, interval, suspect=state == "suspect")
    notes = []
    if rep.get("robust_accuracy_protocol") is not None:
        alone = pct("robust_accuracy_protocol", rep["robust_accuracy_protocol"])
        notes.append(f"The protocol's attacks alone, before the extra attacks: {alone}.")
    if extra := rep.get("broken_by_extra"):
        counts = ", ".join(f"{escape(k)} {plain(f'broken_by_extra.{k}', v)}" for k, v in extra.items())
        notes.append(f"Examples broken only by the extra attacks: {counts}.")
    notes.append(verdict_text(state))
    body = f'<div class="headline">{clean}{robust}</div>\n' + "".join(f'<p class="sub">{n}</p>' for n in notes)
    if state == "suspect":
        rules = "".join(f"<li>{rule}</li>" for rule in failed_rules(rep)) or "<li>(no rule recorded)</li>"
        body += f'\n<div class="warn"><strong>SUSPECT robust accuracy</strong>: failed<ul>{rules}</ul></div>'
    return "<h2>Headline</h2>\n" + body


def metric(label: str, value: str, sub: str, *, suspect: bool = False) -> str:
    css = "metric suspect-number" if suspect else "metric"
    return (
        f'<div class="{css}"><div class="label">{escape(label)}</div><div class="value">{value}</div>'
        f'<div class="sub">{sub}</div></div>'
    )


def verdict_text(state: str) -> str:
    return {
        "passed": f"Verdict {badge('passed')}: every sanity check passed.",
        "suspect": f"Verdict {badge('suspect')}: the robust number is likely an artefact of weak attacks or masking.",
        "unchecked": f"Verdict {badge('unchecked')}: no sanity checks ran for this evaluation.",
    }[state]


def attacks_section(rep: dict[str, Any]) -> str:
    after = rep.get("accuracy_after_each_attack")
    if not after:
        return ""
    rows = [[f"<code>{escape(n)}</code>", pct(f"accuracy_after_each_attack.{n}", a)] for n, a in after.items()]
    note = '<p class="sub">Cumulative: an example counts as robust only if no attack so far fooled it.</p>'
    return "<h2>Accuracy after each attack</h2>\n" + note + table(["attack", "robust accuracy"], rows)


def minimal_section(rep: dict[str, Any], curve_uri: str | None) -> str:
    minimal = rep.get("minimal")
    if not minimal:
        return ""
    norm = escape(str(minimal.get("norm", "")))
    rows = [
        [f"median {norm} norm (&infin;: none found)", plain("minimal.median_norm", minimal.get("median_norm"))],
        [f"mean {norm} norm of those found", plain("minimal.mean_norm", minimal.get("mean_norm"))],
    ]
    if "not_found" in minimal:
        rows.append(["examples with none found", plain("minimal.not_found", minimal["not_found"])])
    if "accuracy_at_eps" in minimal:
        rows.append(["accuracy at the evaluation eps", pct("minimal.accuracy_at_eps", minimal["accuracy_at_eps"])])
    if "fixed_eps_accuracy" in minimal:
        rows.append(
            ["the fixed-eps cascade at that eps", pct("minimal.fixed_eps_accuracy", minimal["fixed_eps_accuracy"])]
        )
    rows += [
        [f"median, <code>{escape(n)}</code>", plain(f"minimal.per_attack_median.{n}", v)]
        for n, v in (minimal.get("per_attack_median") or {}).items()
    ]
    parts = ["<h2>Minimal-norm adversarials</h2>", attack_names(minimal, "The smallest perturbation per example over")]
    if minimal.get("looser_than_cascade"):
        parts.append(
            '<div class="warn"><strong>Looser than the cascade</strong>: the minimal-norm attacks leave more examples '
            "robust at this eps than the fixed-eps cascade, so the curve is an upper bound that is loose here; the "
            "robust accuracy reported is the lower, per example.</div>"
        )
    parts += [table(["", "value"], rows), image(curve_uri, "accuracy vs perturbation norm")]
    parts.append(curve_table(minimal.get("curve") or []))
    return "\n".join(p for p in parts if p)


def attack_names(block: dict[str, Any], lead: str) -> str:
    names = [escape(str(a.get("name"))) for a in block.get("attacks") or [] if isinstance(a, dict)]
    return f'<p class="sub">{lead}: {", ".join(f"<code>{n}</code>" for n in names)}.</p>' if names else ""


def curve_table(curve: list[dict[str, float]], *, num_points: int = 6) -> str:
    """A few points of the accuracy-vs-norm curve, evenly spaced, first and last included."""
    if not curve:
        return ""
    n = len(curve)
    picked = sorted({round(i * (n - 1) / max(num_points - 1, 1)) for i in range(min(num_points, n))})
    rows = [
        [plain(f"minimal.curve.{i}.eps", curve[i]["eps"]), pct(f"minimal.curve.{i}.accuracy", curve[i]["accuracy"])]
        for i in picked
    ]
    return table(["eps", "accuracy"], rows)


def transfer_section(rep: dict[str, Any]) -> str:
    transfer = rep.get("transfer")
    if not transfer:
        return ""
    after = transfer.get("accuracy_after_each_attack") or {}
    rows = [[f"<code>{escape(n)}</code>", pct(f"transfer.accuracy_after_each_attack.{n}", a)] for n, a in after.items()]
    if "accuracy" in transfer:
        rows.append(["<strong>worst case over them</strong>", pct("transfer.accuracy", transfer["accuracy"])])
    surrogate = f"<code>{escape(str(transfer.get('surrogate', '?')))}</code>"
    check = f" {pass_fail(bool(transfer['passed']))}" if transfer.get("passed") is not None else ""
    return (
        f"<h2>Transfer attacks{check}</h2>\n"
        f'<p class="sub">Adversarials crafted on the surrogate {surrogate}, scored on this model. A model whose '
        "gradients are masked falls to these more than to its own white-box attacks.</p>\n"
        + table(["attack (on the surrogate)", "accuracy of this model"], rows)
    )


def sanity_section(rep: dict[str, Any], curve_uri: str | None) -> str:
    sanity = rep.get("sanity")
    if not sanity and not curve_uri:
        return ""
    parts = ["<h2>Sanity checks</h2>"]
    if sanity:
        if "num_examples" in sanity:
            parts.append(
                f'<p class="sub">On the first {plain("sanity.num_examples", sanity["num_examples"])} examples.</p>'
            )
        rows = [check_row(name, check) for name, check in (sanity.get("checks") or {}).items()]
        parts.append(table(["check", "result", "rule", "numbers"], rows))
    parts.append(image(curve_uri, "robust accuracy vs eps"))
    return "\n".join(p for p in parts if p)


def check_row(name: str, check: dict[str, Any]) -> list[str]:
    numbers = []
    for key, value in check.items():
        if key == "passed" or not is_number(value):
            continue  # lists such as the eps curve are in the plot below
        path = f"sanity.checks.{name}.{key}"
        shown = pct(path, value) if is_fraction(key) and isinstance(value, float) else plain(path, value)
        numbers.append(f"{escape(key)} {shown}")
    return [
        f"<code>{escape(name)}</code>",
        pass_fail(bool(check.get("passed"))),
        escape(str(check.get("rule", ""))),
        "<br>".join(numbers),
    ]


def versions_section(rep: dict[str, Any], versions: list[dict[str, Any]] | None) -> str:
    if not versions:
        return ""
    current = str((rep.get("model") or {}).get("version"))
    rows, classes = [], []
    for i, v in enumerate(versions):
        this = str(v.get("version")) == current
        aliases = " ".join(f"@{escape(a)}" for a in v.get("aliases") or [])
        label = f"<strong>{escape(str(v.get('version')))}</strong> {aliases}" + (" (this card)" if this else "")
        robust = pct(f"versions.{i}.robust_acc", v.get("robust_acc"))
        if v.get("verdict") == "suspect":
            robust += " " + badge("suspect")
        eps = plain(f"versions.{i}.eps", v.get("eps"))
        protocol = escape(str(v["protocol"])) if v.get("protocol") else "&mdash;"
        verdict_cell = badge(v["verdict"]) if v.get("verdict") in VERDICTS else "&mdash;"
        rows.append([label, protocol, eps, pct(f"versions.{i}.clean_acc", v.get("clean_acc")), robust, verdict_cell])
        classes.append("current" if this else "")
    headers = ["version", "protocol", "eps", "clean accuracy", "robust accuracy", "verdict"]
    return "<h2>Versions of this model</h2>\n" + table(headers, rows, classes=classes)


def seconds_section(rep: dict[str, Any]) -> str:
    seconds = rep.get("seconds")
    if not seconds:
        return ""
    rows = [
        [escape(name), seconds_text(f"seconds.{name}", value)] for name, value in seconds.items() if is_number(value)
    ]
    return "<h2>Time</h2>\n" + table(["", "seconds"], rows)
