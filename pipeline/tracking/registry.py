"""Model registry: listing, robust-accuracy-gated promotion, rollback, loading by alias.

A version becomes `champion` only through `promote`, which checks every gate and reports all of them:
evaluation evidence exists (from `advtrain evaluate`, the policy's protocol, the same threat model); the
evidence's weights sha256 equals the sha256 of the weights stored now; the sanity checks passed; robust
accuracy >= the current champion's + margin (same protocol and threat model, else no comparison);
clean accuracy >= floor. Passing moves `champion`, gives the old one `previous-champion`, and records
the promotion (who, when, gates, numbers) as version tags and in the registered model's history.

Promotions and rollbacks of one registered model are serialised by a lock that lives in the registry
itself: creating the registered model `<name>.promotion-lock` succeeds for exactly one process (the
tracking store's unique name constraint), from any machine. A lock older than `LOCK_STALE_S` (a
crashed holder) is broken. Talks to MLflow through pipeline.tracking.runs's client.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.tracking import runs as tracking
from pipeline.tracking.runs import TrackingError, client_for, load_model, resolve_tracking_uri

__all__ = ["PromotionPolicy", "list_versions", "load_model", "load_policy", "promote", "rollback", "show"]

CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "advtrain.champion_history"
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_S = 600.0


class PromotionPolicy(BaseModel):
    """Gate thresholds (a TOML file with these keys; see jobs/configs/promotion.toml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    protocol: str = Field(default="standard", description="Evidence must come from this evaluation protocol.")
    margin: float = Field(default=0.0, ge=0.0, le=1.0, description="Robust accuracy must beat the champion's by this.")
    clean_floor: float = Field(default=0.5, ge=0.0, le=1.0, description="Minimum clean accuracy.")
    require_sanity: bool = True
    min_examples: int = Field(default=100, ge=1, description="Evidence must cover at least this many examples.")


def load_policy(path: str | Path | None) -> PromotionPolicy:
    if path is None:
        return PromotionPolicy()
    path = Path(path)
    if not path.is_file():
        raise TrackingError(f"promotion policy '{path}' not found")
    try:
        return PromotionPolicy.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise TrackingError(f"{path}: invalid promotion policy: {err}") from None


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    promoted: bool
    dry_run: bool
    gates: list[Gate] = field(default_factory=list)
    previous_champion: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- reading


def _version_row(version) -> dict[str, Any]:
    tags = version.tags
    return {
        "version": str(version.version),
        "aliases": sorted(getattr(version, "aliases", []) or []),
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(version.creation_timestamp / 1000)),
        "run_id": version.run_id,
        "threat_model": f"{tags.get('threat_model.norm', '?')} eps={tags.get('threat_model.eps', '?')}",
        "test_clean_acc": tags.get("test_clean_acc"),
        "eval.clean_acc": tags.get("eval.clean_acc"),
        "eval.robust_acc": tags.get("eval.robust_acc"),
        "eval.protocol": tags.get("eval.protocol"),
        "eval.norm": tags.get("eval.norm"),
        "eval.eps": tags.get("eval.eps"),
        "eval.sanity": tags.get("eval.sanity"),
        "weights_sha256": tags.get("weights_sha256"),
        "tags": dict(tags),
    }


def list_versions(name: str | None = None, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version (of `name`, or of every registered model) with aliases and evaluation numbers."""
    client = client_for(resolve_tracking_uri(tracking_uri or ""))
    models = [_registered(client, name)] if name else client.search_registered_models()
    rows = []
    for model in models:
        if model.name.endswith(LOCK_SUFFIX):
            continue
        # Version search results carry no aliases: take them from the registered model.
        aliases: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name = '{model.name}'"):
            row = {"name": v.name, **_version_row(v)}
            row["aliases"] = sorted(aliases.get(row["version"], []))
            rows.append(row)
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def show(ref: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """`NAME`, `NAME/VERSION` or `NAME@ALIAS` -> the registered model, or one version, with history."""
    client = client_for(resolve_tracking_uri(tracking_uri or ""))
    if "@" in ref or "/" in ref:
        name, version = _resolve_version(client, ref)
        return {"name": name, **_version_row(version)}
    model = _registered(client, ref)
    return {
        "name": ref,
        "aliases": dict(model.aliases),
        "history": json.loads(model.tags.get(HISTORY_TAG, "[]")),
        "versions": [r["version"] for r in list_versions(ref, tracking_uri=tracking_uri)],
    }


def _registered(client, name: str):
    try:
        return client.get_registered_model(name)
    except Exception:  # MlflowException, without importing mlflow here
        raise TrackingError(f"no registered model named '{name}'; `advtrain models list` shows them") from None


def _resolve_version(client, ref: str):
    if "@" in ref:
        name, alias = ref.split("@", 1)
        _registered(client, name)
        try:
            return name, client.get_model_version_by_alias(name, alias)
        except Exception:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise TrackingError(f"'{name}' has no alias '{alias}' (aliases: {aliases or 'none'})") from None
    name, _, version = ref.partition("/")
    _registered(client, name)
    if not version.isdigit():
        raise TrackingError(f"'{ref}': the version must be a number (or use NAME@ALIAS)")
    try:
        return name, client.get_model_version(name, version)
    except Exception:
        raise TrackingError(f"registered model '{name}' has no version {version}") from None


# --------------------------------------------------------------------------- gates


def check_gates(uri: str, client, name: str, version, champion, policy: PromotionPolicy) -> list[Gate]:
    tags = version.tags
    gates: list[Gate] = []
    evidence = "eval.robust_acc" in tags and "eval.weights_sha256" in tags
    protocol_ok = tags.get("eval.protocol") == policy.protocol
    n = int(tags.get("eval.num_examples", "0") or 0)
    train_threat = (tags.get("threat_model.norm"), tags.get("threat_model.eps"))
    eval_threat = (tags.get("eval.norm"), tags.get("eval.eps"))
    same_threat = _same_threat(train_threat, eval_threat)
    gates.append(
        Gate(
            "evidence",
            evidence and protocol_ok and n >= policy.min_examples and same_threat,
            (
                "no evaluation on record: run `advtrain evaluate --model models:/"
                f"{name}/{version.version} --protocol {policy.protocol}`"
            )
            if not evidence
            else (
                f"protocol {tags.get('eval.protocol')} (policy: {policy.protocol}), {n} examples "
                f"(policy: >= {policy.min_examples}), evaluated at {eval_threat[0]} eps={eval_threat[1]} "
                f"(trained for {train_threat[0]} eps={train_threat[1]})"
            ),
        )
    )
    if evidence:
        stored = tracking.stored_weights_sha256(uri, name, str(version.version))
        gates.append(
            Gate(
                "weights_match_evidence",
                stored == tags["eval.weights_sha256"] == tags.get("weights_sha256", stored),
                f"stored weights sha256 {stored[:16]}..., evaluated {tags['eval.weights_sha256'][:16]}..., "
                f"registered {tags.get('weights_sha256', '?')[:16]}...",
            )
        )
        sanity = tags.get("eval.sanity", "missing")
        gates.append(
            Gate(
                "sanity_checks",
                sanity == "passed" or not policy.require_sanity,
                f"sanity checks {sanity}" + ("" if policy.require_sanity else " (not required by policy)"),
            )
        )
        robust = float(tags["eval.robust_acc"])
        if champion is None:
            gates.append(Gate("beats_champion", True, f"robust accuracy {robust:.4f}; no current champion"))
        elif str(champion.version) == str(version.version):
            gates.append(Gate("beats_champion", False, f"version {version.version} is already the champion"))
        else:
            ct = champion.tags
            comparable = ct.get("eval.protocol") == tags.get("eval.protocol") and _same_threat(
                (ct.get("eval.norm"), ct.get("eval.eps")), eval_threat
            )
            if not comparable:
                gates.append(
                    Gate(
                        "beats_champion",
                        False,
                        f"not comparable: champion v{champion.version} was evaluated with protocol "
                        f"{ct.get('eval.protocol')} at {ct.get('eval.norm')} eps={ct.get('eval.eps')}, this one "
                        f"with {tags.get('eval.protocol')} at {eval_threat[0]} eps={eval_threat[1]}",
                    )
                )
            else:
                best = float(ct["eval.robust_acc"])
                gates.append(
                    Gate(
                        "beats_champion",
                        robust >= best + policy.margin,
                        f"robust accuracy {robust:.4f} vs champion v{champion.version} {best:.4f} + margin "
                        f"{policy.margin:.4f}",
                    )
                )
        clean = float(tags.get("eval.clean_acc", "nan"))
        gates.append(
            Gate(
                "clean_floor",
                clean >= policy.clean_floor,
                f"clean accuracy {clean:.4f} vs floor {policy.clean_floor:.4f}",
            )
        )
    return gates


def _same_threat(a: tuple, b: tuple) -> bool:
    try:
        return a[0] == b[0] and abs(float(a[1]) - float(b[1])) < 1e-9
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- lock


class _PromotionLock:
    """Mutual exclusion through the tracking store's unique registered-model names."""

    def __init__(self, client, name: str, *, timeout_s: float = 120.0) -> None:
        self.client, self.lock_name, self.timeout_s = client, name + LOCK_SUFFIX, timeout_s

    def __enter__(self) -> _PromotionLock:
        deadline = time.monotonic() + self.timeout_s
        holder = f"{getpass.getuser()}@{socket.gethostname()}"
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={"holder": holder, "since": str(time.time())},
                    description="advtrain promotion lock: held while a promotion/rollback runs",
                )
                return self
            except Exception:
                self._break_if_stale()
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"another promotion of this model holds '{self.lock_name}'; retry later, or delete that "
                        "registered model if its holder crashed"
                    ) from None
                time.sleep(0.2)

    def _break_if_stale(self) -> None:
        try:
            lock = self.client.get_registered_model(self.lock_name)
        except Exception:
            return
        if time.time() - float(lock.tags.get("since", time.time())) > LOCK_STALE_S:
            with contextlib.suppress(Exception):  # someone else broke it first
                self.client.delete_registered_model(self.lock_name)

    def __exit__(self, *exc: object) -> None:
        self.client.delete_registered_model(self.lock_name)


# --------------------------------------------------------------------------- promote / rollback


def promote(
    name: str,
    version: str,
    *,
    alias: str = CHAMPION,
    policy: PromotionPolicy | None = None,
    dry_run: bool = False,
    tracking_uri: str | None = None,
) -> PromotionResult:
    """Check every gate for NAME/VERSION (VERSION may be an alias, e.g. `challenger`); move `alias` only
    if all pass. A refused promotion changes nothing in the registry."""
    policy = policy or PromotionPolicy()
    uri = resolve_tracking_uri(tracking_uri or "")
    client = client_for(uri)
    ref = f"{name}@{version}" if not str(version).isdigit() else f"{name}/{version}"
    _, target = _resolve_version(client, ref)
    if dry_run:
        champion = _alias_version(client, name, alias)
        gates = check_gates(uri, client, name, target, champion, policy)
        return PromotionResult(name, str(target.version), alias, False, True, gates, _v(champion))
    with _PromotionLock(client, name):
        # Read the champion inside the lock: a racing promotion may just have moved it.
        champion = _alias_version(client, name, alias)
        target = client.get_model_version(name, str(target.version))
        gates = check_gates(uri, client, name, target, champion, policy)
        result = PromotionResult(name, str(target.version), alias, False, False, gates, _v(champion))
        if not all(g.passed for g in gates):
            return result
        record = {
            "event": "promote",
            "alias": alias,
            "version": str(target.version),
            "previous": _v(champion),
            "by": getpass.getuser(),
            "host": socket.gethostname(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "robust_acc": target.tags.get("eval.robust_acc"),
            "clean_acc": target.tags.get("eval.clean_acc"),
            "protocol": target.tags.get("eval.protocol"),
        }
        _append_history(client, name, record)
        for key, value in {
            "promotion.by": record["by"],
            "promotion.at": record["at"],
            "promotion.alias": alias,
            "promotion.previous": record["previous"] or "",
            "promotion.gates": json.dumps([asdict(g) for g in gates]),
        }.items():
            client.set_model_version_tag(name, str(target.version), key, value)
        if champion is not None and alias == CHAMPION:
            client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
        client.set_registered_model_alias(name, alias, str(target.version))
        result.promoted = True
        return result


def rollback(name: str, *, alias: str = CHAMPION, tracking_uri: str | None = None) -> dict[str, Any]:
    """Move `champion` back to the version it replaced (recorded); `previous-champion` steps back too."""
    uri = resolve_tracking_uri(tracking_uri or "")
    client = client_for(uri)
    with _PromotionLock(client, name):
        model = _registered(client, name)
        history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
        current = _alias_version(client, name, alias)
        if current is None:
            raise TrackingError(f"'{name}' has no '{alias}' to roll back")
        # The champion before the current one: the `previous` of the record that made it champion.
        made = next(
            (r for r in reversed(history) if r["alias"] == alias and r["version"] == str(current.version)), None
        )
        previous = made["previous"] if made else None
        if not previous:
            raise TrackingError(f"'{name}': no earlier {alias} recorded before version {current.version}")
        before_previous = next(
            (r["previous"] for r in reversed(history) if r["alias"] == alias and r["version"] == previous), None
        )
        record = {
            "event": "rollback",
            "alias": alias,
            "version": previous,
            "previous": str(current.version),
            "by": getpass.getuser(),
            "host": socket.gethostname(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _append_history(client, name, record)
        client.set_registered_model_alias(name, alias, previous)
        if alias == CHAMPION:
            if before_previous:
                client.set_registered_model_alias(name, PREVIOUS, before_previous)
            else:
                client.delete_registered_model_alias(name, PREVIOUS)
        return record


def _alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:
        _registered(client, name)
        return None


def _v(version) -> str | None:
    return None if version is None else str(version.version)


def _append_history(client, name: str, record: dict[str, Any]) -> None:
    model = client.get_registered_model(name)
    history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    history.append(record)
    # Tag values are limited in size (5000 chars in the sqlite store); keep the most recent records.
    text = json.dumps(history)
    while len(text) > 4900 and len(history) > 1:
        history.pop(0)
        text = json.dumps(history)
    client.set_registered_model_tag(name, HISTORY_TAG, text)
