"""Robust-accuracy-gated promotion against a real `mlflow server`, with real evaluation evidence."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.orchestrate.evaluation import run_evaluation
from pipeline.tracking import model_store, promotion_lock, registry, registry_writes
from pipeline.tracking import runs as tracking
from pipeline.tracking.registry import PromotionPolicy
from pipeline.tracking.runs import TrackingError, client_for

pytestmark = pytest.mark.integration
# The gate logic is what is tested here: `fast` evidence with sanity checks keeps the suite quick (the
# default policy asks for `standard`, which tests/integration/test_evaluation.py exercises).
POLICY = PromotionPolicy(protocol="fast", min_examples=60)


def _register(uri, name, model, arch, digits_path) -> str:
    run_id, _ = tracking.start_or_resume_run(
        uri,
        experiment="registry-it",
        run_name=f"{name}-{len(client_for(uri).search_model_versions(f'name = {name!r}'))}",
        params={"data.path": str(digits_path), "attack.norm": "linf", "attack.eps": 0.2},
        config_toml="",
        tags={},
    )
    arch = {k: v for k, v in arch.items() if k != "weights_sha256"}
    registered = model_store.log_and_register_model(
        uri,
        run_id,
        model=model,
        arch=arch,
        registered_model=name,
        version_tags={"threat_model.norm": "linf", "threat_model.eps": 0.2},
        alias="",
    )
    return str(registered["version"])


def _evaluate(uri, name, version, tmp_path):
    return run_evaluation(
        f"models:/{name}/{version}",
        tracking_uri=uri,
        num_examples=60,
        protocol="fast",
        run_sanity=True,
        out_dir=tmp_path / f"{name}-{version}",
        progress=False,
    )


def _dead_model(arch):
    """A degenerate small_cnn whose first ReLUs are all dead: constant output, zero input gradient."""
    from pipeline.models import build_model

    model = build_model(arch)
    with torch.no_grad():
        model[1].features[0].bias.fill_(-1e4)
    return model.eval()


def _snapshot(uri, name):
    client = client_for(uri)
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    return dict(model.aliases), dict(model.tags), {v.version: dict(v.tags) for v in versions}


@pytest.fixture(scope="module")
def versions(ray_address, mlflow_server, digits_path, undefended, adversarially_trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    at_model, at_folder = adversarially_trained
    arch = json.loads((at_folder / "architecture.json").read_text())
    # The undefended model comes in as a model advtrain did not train (`advtrain models register`): a
    # .safetensors file and a dataset; promotion then treats it like the others.
    from pipeline.model_folder import WEIGHTS_FILE, save_weights
    from pipeline.orchestrate.registration import register_external_model

    save_weights(undefended, arch, tmp / "undefended")
    external = register_external_model(
        "small_cnn",
        str(tmp / "undefended" / WEIGHTS_FILE),
        data_path=str(digits_path),
        registered_model="promo",
        norm="linf",
        eps=0.2,
        tracking_uri=mlflow_server,
    )
    v = {
        "undefended": str(external["version"]),
        "at": _register(mlflow_server, "promo", at_model, arch, digits_path),
        "dead": _register(mlflow_server, "promo", _dead_model(arch), arch, digits_path),
        "no_evidence": _register(mlflow_server, "promo", at_model, arch, digits_path),
        "tampered": _register(mlflow_server, "promo", at_model, arch, digits_path),
    }
    reports = {key: _evaluate(mlflow_server, "promo", v[key], tmp) for key in ("undefended", "at", "dead", "tampered")}
    return v, reports


def test_promotion_gates_aliases_and_rollback(versions, mlflow_server):
    v, reports = versions
    client = client_for(mlflow_server)
    assert reports["at"]["robust_accuracy"] > reports["undefended"]["robust_accuracy"] + 0.2

    external = client.get_model_version("promo", v["undefended"])
    assert external.tags["method"] == "external" and external.tags["threat_model.eps"] == "0.2"
    first = registry.promote("promo", v["undefended"], policy=POLICY, tracking_uri=mlflow_server)
    assert first.promoted, first.gates
    better = registry.promote("promo", v["at"], policy=POLICY, tracking_uri=mlflow_server)
    assert better.promoted, better.gates
    aliases = client.get_registered_model("promo").aliases
    assert aliases["champion"] == v["at"] and aliases["previous-champion"] == v["undefended"]
    listed = {r["version"]: r["aliases"] for r in registry.list_versions("promo", tracking_uri=mlflow_server)}
    assert listed[v["at"]] == ["champion"] and listed[v["undefended"]] == ["previous-champion"]
    tags = client.get_model_version("promo", v["at"]).tags
    assert tags["promotion.previous"] == v["undefended"] and json.loads(tags["promotion.gates"])

    def refused(version, gate, policy=POLICY):
        before = _snapshot(mlflow_server, "promo")
        result = registry.promote("promo", version, policy=policy, tracking_uri=mlflow_server)
        assert not result.promoted
        failed = {g.name for g in result.gates if not g.passed}
        assert gate in failed, result.gates
        assert _snapshot(mlflow_server, "promo") == before  # registry exactly as it was
        return result

    worse = refused(v["undefended"], "beats_champion")
    assert "vs champion" in next(g.detail for g in worse.gates if g.name == "beats_champion")
    refused(v["dead"], "sanity_checks", PromotionPolicy(protocol="fast", min_examples=60, clean_floor=0.0))
    missing = refused(v["no_evidence"], "evidence")
    assert "advtrain evaluate" in missing.gates[0].detail

    record = registry.rollback("promo", tracking_uri=mlflow_server)
    assert record["version"] == v["undefended"]
    assert client.get_registered_model("promo").aliases["champion"] == v["undefended"]
    history = registry.show("promo", tracking_uri=mlflow_server)["history"]
    assert [h["event"] for h in history] == ["promote", "promote", "rollback"]
    assert registry.promote("promo", v["at"], policy=POLICY, tracking_uri=mlflow_server).promoted


def test_changed_weights_after_evaluation_are_refused(versions, mlflow_server_root):
    v, _ = versions
    uri, root = mlflow_server_root
    client = client_for(uri)
    source = client.get_model_version("promo", v["tampered"]).source  # models:/m-<id>
    model_id = source.rsplit("/", 1)[-1]
    weights = [p for p in (root / "artifacts").rglob("model.safetensors") if model_id in str(p)]
    assert len(weights) == 1
    raw = bytearray(weights[0].read_bytes())
    raw[-3] ^= 0x01
    weights[0].write_bytes(bytes(raw))
    before = _snapshot(uri, "promo")
    result = registry.promote("promo", v["tampered"], policy=POLICY, tracking_uri=uri)
    assert not result.promoted
    assert not next(g for g in result.gates if g.name == "weights_match_evidence").passed
    assert _snapshot(uri, "promo") == before
    with pytest.raises(TrackingError, match="does not match"):
        model_store.load_model(f"models:/promo/{v['tampered']}", tracking_uri=uri)


def test_champion_loads_in_fresh_process_with_the_evaluated_accuracy(versions, mlflow_server, digits_path):
    v, _reports = versions
    registry.promote("promo", v["at"], policy=POLICY, tracking_uri=mlflow_server)  # champion already or now
    champion = client_for(mlflow_server).get_registered_model("promo").aliases["champion"]
    code = f"""
import json, torch
torch.set_num_threads(1)
from pipeline.tracking.registry import load_model
from pipeline.data import load_split
from pipeline.training.validation import predict
model = load_model("models:/promo@champion")
x, y = load_split({str(digits_path)!r}, "test", max_examples=60)
pred = predict(model, x, batch_size=64, device=torch.device("cpu"))
print(json.dumps({{"clean": int((pred == y).sum()) / len(y), "training": model.training}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    tags = client_for(mlflow_server).get_model_version("promo", champion).tags
    assert loaded["clean"] == float(tags["eval.clean_acc"]) and loaded["training"] is False


def test_racing_promotions_leave_one_champion_and_a_consistent_history(
    ray_address, mlflow_server, digits_path, undefended, adversarially_trained, tmp_path
):
    at_model, at_folder = adversarially_trained
    arch = json.loads((at_folder / "architecture.json").read_text())
    base = _register(mlflow_server, "race", undefended, arch, digits_path)
    contenders = [_register(mlflow_server, "race", at_model, arch, digits_path) for _ in range(2)]
    for version in (base, *contenders):
        _evaluate(mlflow_server, "race", version, tmp_path)
    assert registry.promote("race", base, policy=POLICY, tracking_uri=mlflow_server).promoted
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('protocol = "fast"\nmin_examples = 60\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    advtrain = str(Path(sys.executable).with_name("advtrain"))
    racers = [
        subprocess.Popen(
            [advtrain, "promote", "--name", "race", "--version", v, "--policy", str(policy_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for v in contenders
    ]
    outputs = [r.communicate(timeout=300)[0] for r in racers]
    assert all(r.returncode == 0 for r in racers), outputs  # equal robust accuracy passes margin 0
    client = client_for(mlflow_server)
    model = client.get_registered_model("race")
    history = json.loads(model.tags[registry.HISTORY_TAG])
    promotions = [h for h in history if h["event"] == "promote"]
    assert next(h["version"] for h in promotions) == base and len(promotions) == 3
    # A chain: each promotion's `previous` is the champion the one before it installed.
    for earlier, later in itertools.pairwise(promotions):
        assert later["previous"] == earlier["version"], history
    assert model.aliases["champion"] == promotions[-1]["version"]
    assert model.aliases["previous-champion"] == promotions[-2]["version"]
    assert not [m for m in client.search_registered_models() if m.name.endswith(registry.LOCK_SUFFIX)]


def test_registry_through_a_basic_auth_server(mlflow_auth_server, undefended, digits_path, monkeypatch):
    """Credentials come from MLflow's environment variables; without them, a clear refusal; never logged."""
    uri, user, password = mlflow_auth_server
    from pipeline.config import ModelConfig
    from pipeline.data import read_metadata
    from pipeline.models import architecture

    info = read_metadata(digits_path)
    arch = architecture(ModelConfig(), shape=info.shape, num_classes=10, mean=info.mean, std=info.std)
    with pytest.raises(Exception, match=r"401|Unauthorized|credentials"):
        registry.list_versions(tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    run_id, _ = tracking.start_or_resume_run(
        uri, experiment="auth-it", run_name="auth-it", params={"attack.eps": 0.2}, config_toml="", tags={}
    )
    registered = model_store.log_and_register_model(
        uri, run_id, model=undefended, arch=arch, registered_model="auth-model", version_tags={}, alias="challenger"
    )
    rows = registry.list_versions("auth-model", tracking_uri=uri)
    assert [r["version"] for r in rows] == [str(registered["version"])] and rows[0]["aliases"] == ["challenger"]
    result = registry.promote("auth-model", "challenger", dry_run=True, tracking_uri=uri)
    assert not result.promoted and "advtrain evaluate" in result.gates[0].detail
    loaded = model_store.load_model("models:/auth-model@challenger", tracking_uri=uri)
    assert loaded.training is False
    run = client_for(uri).get_run(run_id)
    recorded = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert password not in recorded


# ------------------------------------------------------------------ refused or failed commands change nothing


def _cli(capsys, monkeypatch, uri, *argv: str) -> tuple[int, str]:
    from pipeline import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = cli.run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _whole_registry(uri) -> dict:
    """Every registered model's aliases and tags, and every version's tags: the whole registry (read
    without name filters, which a model named with a quote would break)."""
    client = client_for(uri)
    models = {m.name: (dict(m.aliases), dict(m.tags)) for m in client.search_registered_models()}
    versions = {(v.name, v.version): dict(v.tags) for v in client.search_model_versions()}
    return {"models": models, "versions": versions}


def test_refused_commands_exit_2_and_leave_the_whole_registry_as_it_was(
    versions, mlflow_server, capsys, monkeypatch, tmp_path
):
    v, _ = versions
    client = client_for(mlflow_server)
    client.create_registered_model("broken-history", tags={registry.HISTORY_TAG: '{"not": "a list"'})
    client.create_registered_model("made-by-another-tool's")  # a quote: once broke `models list` for all
    policy = tmp_path / "policy.toml"
    policy.write_text('protocol = "fast"\nmin_examples = 60\n')
    cases = [
        (("promote", "--name", "promo", "--version", v["at"], "--alias", "latest"), "reserved by MLflow"),
        (("promote", "--name", "promo", "--version", v["at"], "--alias", "v1"), "reserved by MLflow"),
        (("promote", "--name", "promo", "--version", v["at"], "--alias", "new champion"), "--alias"),
        (("promote", "--name", "promo", "--version", "999", "--policy", str(policy)), "has no version 999"),
        (("promote", "--name", "promo", "--version", "nosuchalias", "--policy", str(policy)), "no alias"),
        (("promote", "--name", "promo'x", "--version", v["at"]), "--name"),
        (("rollback", "--name", "promo", "--alias", "v2"), "reserved by MLflow"),
        (("rollback", "--name", "broken-history"), registry.HISTORY_TAG),
        (("models", "show", "broken-history"), registry.HISTORY_TAG),
        (("models", "list", "promo' OR name LIKE '%"), "registered model"),
    ]
    before = _whole_registry(mlflow_server)
    for argv, named in cases:
        code, text = _cli(capsys, monkeypatch, mlflow_server, *argv)
        assert code == 2, (argv, text)
        assert named in text and "Traceback" not in text, (argv, text)
        assert _whole_registry(mlflow_server) == before, argv
    code, text = _cli(capsys, monkeypatch, mlflow_server, "models", "list")
    assert code == 0 and "promo " in text and "broken-history" not in text, text
    # A documented refusal (a gate fails: worse than the champion) is exit 1, also through the CLI.
    assert client.get_registered_model("promo").aliases["champion"] == v["at"]
    code, text = _cli(
        capsys,
        monkeypatch,
        mlflow_server,
        "promote",
        "--name",
        "promo",
        "--version",
        v["undefended"],
        "--policy",
        str(policy),
    )
    assert code == 1 and "refused" in text and "beats_champion" in text, text
    assert _whole_registry(mlflow_server) == before


def test_a_write_failing_midway_is_undone_and_said(versions, mlflow_server):
    """Real writes against the server, the last of which MLflow refuses (an alias to a version that does
    not exist): the history tag, a version tag and an alias written before it are put back."""
    v, _ = versions
    client = client_for(mlflow_server)
    model = client.get_registered_model("promo")
    before = _whole_registry(mlflow_server)
    record = registry._event("promote", "champion", v["at"], None)
    writes = [
        registry._history_write(client, model, record),
        registry_writes.version_tag_write(
            client,
            "promo",
            v["at"],
            "promotion.by",
            "x",
            client.get_model_version("promo", v["at"]).tags.get("promotion.by"),
        ),
        registry_writes.version_tag_write(client, "promo", v["at"], "promotion.new-tag", "x", None),
        registry_writes.alias_write(client, model, "champion", v["undefended"]),
        registry_writes.alias_write(client, model, "an-alias-that-did-not-exist", v["at"]),
        registry_writes.alias_write(client, model, "previous-champion", "999"),
    ]
    with pytest.raises(TrackingError, match="every earlier write was undone: the registry is as it was"):
        registry_writes.all_or_nothing(writes, "a promotion")
    assert _whole_registry(mlflow_server) == before


def test_a_crashed_holders_lock_with_an_unreadable_timestamp_is_still_broken(mlflow_server, monkeypatch):
    """The lock's age falls back to the store's creation time: a garbage `since` tag no longer makes a
    lock unbreakable (it made every later promotion wait 120 s and fail)."""
    client = client_for(mlflow_server)
    client.create_registered_model("lockx")
    client.create_registered_model("lockx" + registry.LOCK_SUFFIX, tags={"holder": "crashed", "since": "garbage"})
    monkeypatch.setattr(promotion_lock, "LOCK_STALE_S", 1.0)
    time.sleep(1.5)
    started = time.monotonic()
    with pytest.raises(TrackingError, match="has no 'champion' to roll back"):
        registry.rollback("lockx", tracking_uri=mlflow_server)
    assert time.monotonic() - started < 30
    assert not [m for m in client.search_registered_models() if m.name == "lockx" + registry.LOCK_SUFFIX]
