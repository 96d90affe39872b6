"""The model card in a real browser (headless Chromium): every embedded image decodes, every number it
shows is the report's exact value at its data-key, and a suspect robust number is marked as such.

The card is built from a real small evaluation in this process (no Ray): the `fast` protocol and the
real sanity checks on 64 digits examples, the real report and plots."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.attacks import get_attack
from pipeline.attacks.minimal import perturbation_norms
from pipeline.card import render_card, write_card
from pipeline.data import load_split, read_metadata
from pipeline.evaluate import ChunkResult, evaluate_examples
from pipeline.evaluation_report import plot_curve, plot_examples, plot_minimal_curve, report
from pipeline.model_folder import save_weights
from pipeline.sanity import sanity_checks

EPS = 0.1
NUM_EXAMPLES = 64


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium not installed: apt-get install -y chromium (Debian) to run the model card browser test")
    return path


# --- a real evaluation ---------------------------------------------------------------------------


def _linear_surrogate(digits_path: Path) -> torch.nn.Module:
    """Logistic regression fitted on the train split: a real, independent surrogate that costs no training
    loop (a second CNN would double the test's time)."""
    x, y = load_split(digits_path, "train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * model[1].weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.eval()


def _add_deepfool_norms(model, x, y, result: ChunkResult) -> None:
    """Per-example minimal Linf norms from DeepFool alone, unbounded, as `--protocol minimal` records them
    (inf: none found, 0: clean-wrong). The full minimal protocol (the standard cascade, FMN, FAB-T) takes
    minutes on a CPU; DeepFool takes a fraction of a second and fills the same fields of the report."""
    clean = result.clean_correct
    norms = torch.where(clean, math.inf, 0.0)
    idx = clean.nonzero().squeeze(1)
    x_adv = get_attack("deepfool")(model, x[idx], y[idx], eps=math.inf, norm="linf", num_steps=50, overshoot=0.02)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y[idx]
    size = perturbation_norms(x[idx], x_adv, "linf").float()
    norms[idx] = torch.where(fooled, size, torch.full_like(size, math.inf))
    result.min_norms["deepfool"] = norms


def _versions(rep: dict[str, Any], earlier) -> list[dict[str, Any]]:
    """The registry's view: an earlier version (here the surrogate, evaluated for real) and this one."""
    return [
        {
            "version": "1",
            "aliases": [],
            "clean_acc": float(earlier.clean_correct.float().mean()),
            "robust_acc": float(earlier.robust.float().mean()),
            "verdict": "unchecked",
            "protocol": "fast",
            "eps": EPS,
        },
        {
            "version": rep["model"]["version"],
            "aliases": ["challenger"],
            "clean_acc": rep["clean_accuracy"],
            "robust_acc": rep["robust_accuracy"],
            "verdict": rep["verdict"],
            "protocol": rep["protocol"]["name"],
            "eps": EPS,
        },
    ]


@pytest.fixture(scope="module")
def evaluated(undefended, digits_path, tmp_path_factory) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """(folder with report.json and its PNGs, as `advtrain evaluate` writes them; the report as read back;
    the versions list)."""
    return _evaluate(digits_path, undefended, tmp_path_factory.mktemp("card"))


def _evaluate(digits_path: Path, undefended, out: Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    started = time.perf_counter()
    x, y = load_split(digits_path, "val", max_examples=NUM_EXAMPLES)
    surrogate = _linear_surrogate(digits_path)
    attack = {"norm": "linf", "eps": EPS, "protocol": "fast", "seed": 0}
    result = evaluate_examples(undefended, x, y, chunk_size=64, surrogate=surrogate, **attack)
    _add_deepfool_norms(undefended, x, y, result)
    sanity = sanity_checks(undefended, x, y, num_classes=10, result=result, **attack)
    info = read_metadata(digits_path)
    model_info = {
        "uri": "models:/digits-card/2",
        "name": "digits-card",
        "version": "2",
        "run_id": None,
        "weights_sha256": save_weights(undefended, {"name": "small_cnn"}, out / "model"),
        "architecture": "small_cnn",
    }
    data_info = {"path": str(digits_path), "split": "val", "source": info.source}
    rep = report(
        result,
        sanity=sanity,
        model_info=model_info,
        data_info=data_info,
        seconds=time.perf_counter() - started,
        surrogate="logistic regression (digits train split)",
        **attack,
    )
    versions = _versions(rep, evaluate_examples(surrogate, x, y, chunk_size=64, **attack))

    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    plot_curve(sanity, out / "accuracy_vs_eps.png", norm="linf", eps=EPS)
    plot_examples(x, y, result, list(info.class_names), out / "examples.png")
    plot_minimal_curve(rep, out / "minimal_curve.png")
    return out, json.loads((out / "report.json").read_text()), versions


# --- the browser and the DOM it renders ----------------------------------------------------------


def _browser(chromium: str, card: Path, profile: Path, *extra: str) -> str:
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        f"--user-data-dir={profile}",  # its own profile: other Chromium processes on the machine keep theirs
        *extra,
        card.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Dom(HTMLParser):
    """The rendered DOM: body attributes, every span.num (key, value, text), every img src, and each div's
    and td's text with the data-keys inside it."""

    VOID = frozenset({"img", "meta", "br", "link", "input", "hr", "source", "wbr"})
    BOXES = frozenset({"div", "td"})

    def __init__(self, html: str) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.numbers: list[dict[str, str]] = []
        self.boxes: list[dict[str, Any]] = []
        self.images: list[str] = []
        self._open: list[tuple[str, dict[str, Any] | None, bool]] = []  # (tag, box, is a span.num)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        classes = attrs.get("class", "").split()
        if tag == "body":
            self.body = attrs
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        is_num = tag == "span" and "num" in classes
        if is_num:
            self.numbers.append({"key": attrs["data-key"], "value": attrs["data-value"], "text": ""})
            for _, box, _ in self._open:
                if box is not None:
                    box["keys"].add(attrs["data-key"])
        if tag in self.VOID:
            return
        box = {"tag": tag, "classes": classes, "text": "", "keys": set()} if tag in self.BOXES else None
        if box is not None:
            self.boxes.append(box)
        self._open.append((tag, box, is_num))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._open and self._open[-1][2]:
            self.numbers[-1]["text"] += data
        for _, box, _ in self._open:
            if box is not None:
                box["text"] += data

    def box_with(self, tag: str, *, key: str, css: str = "") -> dict[str, Any]:
        """The innermost `tag` holding the number at `key` (and with class `css`, if given)."""
        found = [b for b in self.boxes if b["tag"] == tag and key in b["keys"] and (not css or css in b["classes"])]
        return min(found, key=lambda b: len(b["text"]))


def _resolve(rep: dict[str, Any], versions: list[dict[str, Any]], key: str) -> Any:
    """The value at a dotted data-key; a key segment may itself hold dots ("seconds.attack.apgd_ce")."""
    parts = key.split(".")
    if parts[0] == "versions" and parts[1].isdigit():
        return _walk(versions[int(parts[1])], parts[2:])
    return _walk(rep, parts)


def _walk(node: Any, parts: list[str]) -> Any:
    if not parts:
        return node
    if isinstance(node, list):
        return _walk(node[int(parts[0])], parts[1:])
    for n in range(len(parts), 0, -1):  # the longest key first
        name = ".".join(parts[:n])
        if name in node:
            return _walk(node[name], parts[n:])
    raise KeyError(".".join(parts))


def _shown_matches(text: str, value: float) -> bool:
    """The displayed text is the value rounded (as a percentage, in seconds, or plain; inf as the sign)."""
    text = text.strip()
    if math.isinf(value):
        return text == ("\u221e" if value > 0 else "-\u221e")
    scale = 100.0 if text.endswith("%") else 1.0
    number = text.removesuffix("%").removesuffix(" s")
    if "e" in number:
        return math.isclose(float(number), value, rel_tol=5e-3)  # 3 significant digits at least
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) / scale - value) <= 0.5 * 10.0**-decimals / scale + 1e-12


def _numbers(block: dict[str, Any], prefix: str) -> set[str]:
    """The data-keys of a block's scalar numbers (None is shown as a dash, without a key)."""
    return {f"{prefix}.{k}" for k, v in block.items() if type(v) in (int, float)}


def _expected_keys(rep: dict[str, Any], versions: list[dict[str, Any]]) -> set[str]:
    """Every number of the report the card must show (the minimal curve only in part, by design)."""
    keys = _numbers(rep, "") - {".verdict"}
    keys = {k.lstrip(".") for k in keys} | {"robust_accuracy_ci95.0", "robust_accuracy_ci95.1"}
    keys |= {"threat_model.eps", "protocol.num_examples", "protocol.seed", "sanity.num_examples"}
    for name in ("accuracy_after_each_attack", "broken_by_extra", "seconds", "minimal", "transfer"):
        keys |= _numbers(rep[name], name)
    keys |= _numbers(rep["minimal"]["per_attack_median"], "minimal.per_attack_median")
    keys |= _numbers(rep["transfer"]["accuracy_after_each_attack"], "transfer.accuracy_after_each_attack")
    keys |= {"minimal.curve.0.eps", "minimal.curve.0.accuracy", f"minimal.curve.{len(rep['minimal']['curve']) - 1}.eps"}
    for name, check in rep["sanity"]["checks"].items():
        keys |= _numbers(check, f"sanity.checks.{name}")
    for i, version in enumerate(versions):
        keys |= _numbers(version, f"versions.{i}")
    return keys


# --- the tests -----------------------------------------------------------------------------------


def test_card_renders_every_image_and_the_reports_exact_numbers(chromium, evaluated, tmp_path):
    out, rep, versions = evaluated
    card = write_card(out, rep, versions=versions)
    html = card.read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched: it renders in an iframe offline
    dom = _Dom(_browser(chromium, card, tmp_path / "profile", "--dump-dom"))

    assert len(dom.images) == 3 and all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert dom.body["data-images-total"] == "3"
    assert dom.body["data-images-loaded"] == dom.body["data-images-total"]
    for number in dom.numbers:
        value = _resolve(rep, versions, number["key"])
        assert float(number["value"]) == float(value), number
        assert _shown_matches(number["text"], float(value)), number
    assert _expected_keys(rep, versions) <= {n["key"] for n in dom.numbers}

    # Whatever the real sanity checks concluded is what the card says beside the robust number.
    robust = dom.box_with("div", key="robust_accuracy", css="value")
    assert f"{100 * rep['robust_accuracy']:.2f}%" in robust["text"]
    assert rep["verdict"].upper() in robust["text"]


def _variant(out: Path, real: dict[str, Any], versions: list[dict[str, Any]], folder: Path, *, failed: str | None):
    """The real report with the sanity outcome set: `failed` names the one check that fails (None: all pass).
    Only the verdict differs from the real evaluation, which is what these tests are about."""
    rep, versions = copy.deepcopy(real), copy.deepcopy(versions)
    for name, check in rep["sanity"]["checks"].items():
        check["passed"] = name != failed
    rep["sanity"]["passed"] = failed is None
    rep["suspect"], rep["verdict"] = failed is not None, "passed" if failed is None else "suspect"
    versions[-1]["verdict"] = rep["verdict"]
    folder.mkdir()
    for png in out.glob("*.png"):
        shutil.copy(png, folder / png.name)
    (folder / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    return write_card(folder, rep, versions=versions), rep, versions


def test_suspect_card_marks_the_robust_number_and_names_the_failed_rule(chromium, evaluated, tmp_path):
    card, rep, versions = _variant(*evaluated, tmp_path / "suspect", failed="unbounded_attack")
    dom = _Dom(_browser(chromium, card, tmp_path / "profile", "--dump-dom"))

    robust = dom.box_with("div", key="robust_accuracy", css="value")
    assert "SUSPECT" in robust["text"] and "PASSED" not in robust["text"]
    warning = next(b for b in dom.boxes if "warn" in b["classes"] and "SUSPECT" in b["text"])
    assert "unbounded_attack" in warning["text"]
    assert rep["sanity"]["checks"]["unbounded_attack"]["rule"] in " ".join(warning["text"].split())
    # The versions table marks this version's robust number too, and only this one.
    assert "SUSPECT" in dom.box_with("td", key=f"versions.{len(versions) - 1}.robust_acc")["text"]
    assert "SUSPECT" not in dom.box_with("td", key="versions.0.robust_acc")["text"]

    screenshot = tmp_path / "card.png"
    _browser(chromium, card, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1100,2600")
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000


def test_passed_card_shows_no_suspect_mark(chromium, evaluated, tmp_path):
    card, rep, _ = _variant(*evaluated, tmp_path / "passed", failed=None)
    dom = _Dom(_browser(chromium, card, tmp_path / "profile", "--dump-dom"))

    robust = dom.box_with("div", key="robust_accuracy", css="value")
    assert "PASSED" in robust["text"] and "SUSPECT" not in robust["text"]
    # The one warning a passed card may carry: a minimal-norm curve looser than the cascade (a note on the
    # curve, not on the model).
    warnings = [b["text"] for b in dom.boxes if "warn" in b["classes"]]
    assert all(w.startswith("Looser than the cascade") for w in warnings), warnings
    assert bool(warnings) == rep["minimal"]["looser_than_cascade"], warnings
    assert "SUSPECT" not in " ".join(b["text"] for b in dom.boxes)


def test_card_escapes_report_strings_and_leaves_out_missing_sections():
    """A report's strings come from users (model names, data paths): shown as text, never as markup. A
    report without sanity checks, plots or extra attacks gives a card without those sections."""
    rep = {
        "model": {"name": "<script>alert(1)</script>", "version": "3", "uri": "models:/x/3?a=1&b=2"},
        "data": {"path": "/d/<img src=x onerror=alert(1)>", "num_images": 12},
        "threat_model": {"norm": "l2", "eps": 0.5},
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.4,
        "robust_accuracy_ci95": [0.3, 0.5],
        "accuracy_after_each_attack": {"apgd_ce": 0.5, "a<b": 0.4},
        "sanity": None,
        "suspect": None,
    }
    html = render_card(rep, images={})
    assert "<script>alert" not in html and "<img src=x" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a=1&amp;b=2" in html
    assert 'data-key="data.num_images" data-value="12"' in html
    assert 'data-key="accuracy_after_each_attack.a&lt;b" data-value="0.4"' in html
    assert "UNCHECKED" in html and "SUSPECT" not in html
    for absent in ("Sanity checks", "Minimal-norm", "Transfer", "Examples", "Versions", "Time"):
        assert f"<h2>{absent}" not in html
    with pytest.raises(ValueError, match="verdict"):
        render_card({**rep, "verdict": "maybe"}, images={})
