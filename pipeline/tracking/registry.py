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
crashed holder) is broken (pipeline.tracking.promotion_lock). Every write of a promotion or rollback is
computed before the first one, and a failure part-way undoes the writes before it
(pipeline.tracking.registry_writes). Talks to MLflow
through pipeline.tracking.runs's client.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
    UNAUTHENTICATED,
)

from pipeline.errors import NAME_PATTERN, checked_alias, checked_name
from pipeline.tracking.gates import Gate, PromotionPolicy, check_gates, load_policy
from pipeline.tracking.model_store import VERSION_NUMBER, load_model
from pipeline.tracking.promotion_lock import LOCK_SUFFIX, PromotionLock
from pipeline.tracking.registry_writes import Write, alias_write, all_or_nothing, model_tag_write, version_tag_write
from pipeline.tracking.runs import TrackingError, client_for, code_in, resolve_tracking_uri

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_SUFFIX",
    "PromotionPolicy",
    "list_versions",
    "load_model",
    "load_policy",
    "promote",
    "rollback",
    "show",
]

CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "advtrain.champion_history"

# How MLflow 3.17 says "there is no such thing" (its SQL store; `mlflow server` passes the same codes on
# as RestException): a missing registered model or version is RESOURCE_DOES_NOT_EXIST; a missing alias,
# and a model or alias name nothing can have (empty, '/', ':'), is INVALID_PARAMETER_VALUE. Every other
# error (server unreachable, 401/403, a broken store) is re-raised, never reported as "not found".
_NO_SUCH_NAME = (RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE)
_NOT_FOUND = (RESOURCE_DOES_NOT_EXIST,)


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
    if name is not None:
        checked_name(name, "registered model")  # it goes into a filter string below
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
        if not NAME_PATTERN.fullmatch(model.name):  # registered by other tools: a quote or a trailing
            # backslash would break the filter string below (and `models list` for every model)
            log.warning("skipping registered model %r: its name is not one advtrain can search for", model.name)
            continue
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
        "history": _history(model),
        "versions": [r["version"] for r in list_versions(ref, tracking_uri=tracking_uri)],
    }


def _registered(client, name: str):
    checked_name(name, "registered model")
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        _raise_if_refused(err)
        if not code_in(err, _NO_SUCH_NAME):
            raise
        raise TrackingError(f"no registered model named '{name}'; `advtrain models list` shows them") from None


def _raise_if_refused(err: MlflowException) -> None:
    """A TrackingError for the server refusing us (credentials, permissions), which the user must fix."""
    if code_in(err, (UNAUTHENTICATED, PERMISSION_DENIED)):
        raise TrackingError(
            f"the tracking server refused the request ({err.error_code}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to credentials allowed to do this"
        ) from None


def _history(model) -> list[dict[str, Any]]:
    """The registered model's promotion history; TrackingError where the tag is not the list we write."""
    text = model.tags.get(HISTORY_TAG, "[]")
    try:
        history = json.loads(text)
    except (ValueError, RecursionError):
        history = None
    keys = {"event", "alias", "version", "previous"}
    if not isinstance(history, list) or not all(isinstance(r, dict) and keys <= r.keys() for r in history):
        raise TrackingError(
            f"registered model '{model.name}': its tag {HISTORY_TAG} is not a promotion history (a JSON list of "
            f"records with {', '.join(sorted(keys))}); restore it or delete the tag, then retry"
        )
    return history


def _resolve_version(client, ref: str):
    if "@" in ref:
        name, alias = ref.split("@", 1)
        checked_alias(alias)
        _registered(client, name)
        try:
            return name, client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if not code_in(err, _NO_SUCH_NAME):
                raise
            aliases = sorted(client.get_registered_model(name).aliases)
            raise TrackingError(f"'{name}' has no alias '{alias}' (aliases: {aliases or 'none'})") from None
    name, _, version = ref.partition("/")
    _registered(client, name)
    if not VERSION_NUMBER.fullmatch(version):
        raise TrackingError(f"'{ref}': the version must be a number (or use NAME@ALIAS)")
    try:
        return name, client.get_model_version(name, version)
    except MlflowException as err:
        if not code_in(err, _NOT_FOUND):
            raise
        raise TrackingError(f"registered model '{name}' has no version {version}") from None


def _alias_version(client, name: str, alias: str):
    """The version `alias` points at, or None where it points nowhere; TrackingError for a missing model."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if not code_in(err, _NO_SUCH_NAME):
            raise
    _registered(client, name)  # tell a missing model apart from a missing alias
    return None


# --------------------------------------------------------------------------- promote / rollback


def check_promotion_request(name: str, version: str, alias: str) -> None:
    """Refuse names MLflow would refuse or misread before any request: the alias (MLflow resolves
    'latest' as a version), the version (a number or an alias) and the model name."""
    checked_name(name, "--name")
    checked_alias(alias, "--alias")
    if not VERSION_NUMBER.fullmatch(str(version)):
        checked_alias(str(version), "--version")


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
    if all pass. A refused or failed promotion changes nothing in the registry."""
    check_promotion_request(name, version, alias)
    policy = policy or PromotionPolicy()
    uri = resolve_tracking_uri(tracking_uri or "")
    client = client_for(uri)
    ref = f"{name}/{version}" if VERSION_NUMBER.fullmatch(str(version)) else f"{name}@{version}"
    _, target = _resolve_version(client, ref)
    if dry_run:
        champion = _alias_version(client, name, alias)
        gates = check_gates(uri, client, name, target, champion, policy)
        return PromotionResult(name, str(target.version), alias, False, True, gates, _v(champion))
    with PromotionLock(client, name):
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
    """The writes of a passed promotion, all computed (and the history checked) before the first one:
    history, version tags, then the aliases last. A failed write undoes the ones before it."""
    model = client.get_registered_model(name)
    record = {
        **_event("promote", alias, str(target.version), _v(champion)),
        "robust_acc": target.tags.get("eval.robust_acc"),
        "clean_acc": target.tags.get("eval.clean_acc"),
        "protocol": target.tags.get("eval.protocol"),
    }
    version = str(target.version)
    writes = [_history_write(client, model, record)]
    for key, value in {
        "promotion.by": record["by"],
        "promotion.at": record["at"],
        "promotion.alias": alias,
        "promotion.previous": record["previous"] or "",
        "promotion.gates": json.dumps([asdict(g) for g in gates]),
    }.items():
        writes.append(version_tag_write(client, name, version, key, value, target.tags.get(key)))
    if champion is not None and alias == CHAMPION:
        writes.append(alias_write(client, model, PREVIOUS, str(champion.version)))
    writes.append(alias_write(client, model, alias, version))
    all_or_nothing(writes, f"promotion of '{name}' version {version} to '{alias}'")


def rollback(name: str, *, alias: str = CHAMPION, tracking_uri: str | None = None) -> dict[str, Any]:
    """Move `champion` back to the version it replaced (recorded); `previous-champion` steps back too."""
    checked_name(name, "--name")
    checked_alias(alias, "--alias")
    uri = resolve_tracking_uri(tracking_uri or "")
    client = client_for(uri)
    with PromotionLock(client, name):
        model = _registered(client, name)
        history = _history(model)
        current = _alias_version(client, name, alias)
        if current is None:
            raise TrackingError(f"'{name}' has no '{alias}' to roll back")
        # The champion before the current one: the `previous` of the record that made it champion.
        previous = _replaced_by(history, alias, str(current.version))
        if not previous:
            raise TrackingError(f"'{name}': no earlier {alias} recorded before version {current.version}")
        before_previous = _replaced_by(history, alias, previous)
        record = _event("rollback", alias, previous, str(current.version))
        writes = [_history_write(client, model, record, history), alias_write(client, model, alias, previous)]
        if alias == CHAMPION:
            writes.append(alias_write(client, model, PREVIOUS, before_previous))
        all_or_nothing(writes, f"rollback of '{name}' '{alias}' to version {previous}")
        return record


def _history_write(client, model, record: dict[str, Any], history: list[dict[str, Any]] | None = None) -> Write:
    """Append `record` to the history (`history`: as already read from `model`, else read here, which
    refuses a history tag that is not a history)."""
    text = _history_text([*(_history(model) if history is None else history), record])
    return model_tag_write(client, model, HISTORY_TAG, text)


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


def _history_text(history: list[dict[str, Any]]) -> str:
    # Tag values are limited in size (5000 chars in the sqlite store); keep the most recent records.
    text = json.dumps(history)
    while len(text) > 4900 and len(history) > 1:
        history.pop(0)
        text = json.dumps(history)
    return text
