"""Model registry: listing, robust-accuracy-gated promotion, rollback, loading by alias.

A version becomes `champion` only through `promote`, which checks every gate and reports all of them:
evaluation evidence exists (from `advtrain evaluate`, the policy's protocol, the same threat model); the
evidence's weights sha256 equals the sha256 of the weights stored now; the sanity checks passed; robust
accuracy >= the current champion's + margin (same protocol and threat model, else no comparison);
clean accuracy >= floor (the gates and the policy live in pipeline.tracking.gates). Passing moves
`champion`, gives the old one `previous-champion`, and records the promotion (who, when, gates,
numbers) as version tags and in the registered model's history.

Promotions and rollbacks of one registered model are serialised by a lock that lives in the registry
itself: creating the registered model `<name>.promotion-lock` succeeds for exactly one process (the
tracking store's unique name constraint), from any machine. A lock older than `LOCK_STALE_S` (a
crashed holder) is broken. Talks to MLflow through pipeline.tracking.runs's client.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)

from pipeline.tracking.gates import Gate, PromotionPolicy, check_gates, load_policy
from pipeline.tracking.model_store import load_model
from pipeline.tracking.runs import TrackingError, client_for, resolve_tracking_uri

__all__ = ["PromotionPolicy", "list_versions", "load_model", "load_policy", "promote", "rollback", "show"]

CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "advtrain.champion_history"
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_S = 600.0

# How MLflow 3.17 says "there is no such thing" (its SQL store; `mlflow server` passes the same codes on
# as RestException): a missing registered model or version is RESOURCE_DOES_NOT_EXIST; a missing alias,
# and a model or alias name nothing can have (empty, '/', ':'), is INVALID_PARAMETER_VALUE. Every other
# error (server unreachable, 401/403, a broken store) is re-raised, never reported as "not found".
_NO_SUCH_NAME = (RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE)
_NOT_FOUND = (RESOURCE_DOES_NOT_EXIST,)


def _code_in(err: MlflowException, codes: tuple[int, ...]) -> bool:
    return err.error_code in {ErrorCode.Name(code) for code in codes}


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
    except MlflowException as err:
        if not _code_in(err, _NO_SUCH_NAME):
            raise
        raise TrackingError(f"no registered model named '{name}'; `advtrain models list` shows them") from None


def _resolve_version(client, ref: str):
    if "@" in ref:
        name, alias = ref.split("@", 1)
        _registered(client, name)
        try:
            return name, client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if not _code_in(err, _NO_SUCH_NAME):
                raise
            aliases = sorted(client.get_registered_model(name).aliases)
            raise TrackingError(f"'{name}' has no alias '{alias}' (aliases: {aliases or 'none'})") from None
    name, _, version = ref.partition("/")
    _registered(client, name)
    if not version.isdigit():
        raise TrackingError(f"'{ref}': the version must be a number (or use NAME@ALIAS)")
    try:
        return name, client.get_model_version(name, version)
    except MlflowException as err:
        if not _code_in(err, _NOT_FOUND):
            raise
        raise TrackingError(f"registered model '{name}' has no version {version}") from None


def _alias_version(client, name: str, alias: str):
    """The version `alias` points at, or None where it points nowhere; TrackingError for a missing model."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if not _code_in(err, _NO_SUCH_NAME):
            raise
    _registered(client, name)  # tell a missing model apart from a missing alias
    return None


# --------------------------------------------------------------------------- lock

# Lock contention, as MLflow reports it to the loser: the name exists; or it vanished between the SQL
# store's failed insert and its look-up of the existing model (the holder released it); or the store is
# busy with the racing writers (sqlite "database is locked"). All three mean: wait and retry.
_LOCK_BUSY = (RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE)


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
            except MlflowException as err:
                if not _code_in(err, _LOCK_BUSY):
                    raise
            self._break_if_stale()
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"another promotion of this model holds '{self.lock_name}'; retry later, or delete that "
                    "registered model if its holder crashed"
                )
            time.sleep(0.2)

    def _break_if_stale(self) -> None:
        try:
            lock = self.client.get_registered_model(self.lock_name)
        except MlflowException as err:
            if _code_in(err, (RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE)):  # released, or busy: retry
                return
            raise
        if _lock_age_s(lock) > LOCK_STALE_S:
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as err:
                if not _code_in(err, _NOT_FOUND):  # someone else broke it first
                    raise

    def __exit__(self, *exc: object) -> None:
        self.client.delete_registered_model(self.lock_name)


def _lock_age_s(lock) -> float:
    """Seconds since the lock was taken; 0 where its `since` tag is missing or unreadable."""
    try:
        return time.time() - float(lock.tags.get("since", time.time()))
    except (TypeError, ValueError):
        # Its age is unknown, so it is never broken: the timeout's message says how to remove it.
        return 0.0


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
        _record_promotion(client, name, target, champion, alias, gates)
        result.promoted = True
        return result


def _record_promotion(client, name: str, target, champion, alias: str, gates: list[Gate]) -> None:
    """The writes of a passed promotion, under the lock: history, version tags, then the aliases last, so
    a failure part-way leaves the alias where it was."""
    record = {
        **_event("promote", alias, str(target.version), _v(champion)),
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
        previous = _replaced_by(history, alias, str(current.version))
        if not previous:
            raise TrackingError(f"'{name}': no earlier {alias} recorded before version {current.version}")
        before_previous = _replaced_by(history, alias, previous)
        record = _event("rollback", alias, previous, str(current.version))
        _append_history(client, name, record)
        client.set_registered_model_alias(name, alias, previous)
        if alias == CHAMPION:
            if before_previous:
                client.set_registered_model_alias(name, PREVIOUS, before_previous)
            else:
                client.delete_registered_model_alias(name, PREVIOUS)
        return record


def _replaced_by(history: list[dict[str, Any]], alias: str, version: str) -> str | None:
    """The version that `alias` pointed at before the latest record that moved it to `version`."""
    made = next((r for r in reversed(history) if r["alias"] == alias and r["version"] == version), None)
    return made["previous"] if made else None


def _event(event: str, alias: str, version: str, previous: str | None) -> dict[str, Any]:
    """A history record: what moved where, and who did it from which host, when."""
    return {
        "event": event,
        "alias": alias,
        "version": version,
        "previous": previous,
        "by": getpass.getuser(),
        "host": socket.gethostname(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
