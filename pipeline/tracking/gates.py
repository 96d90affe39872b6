"""Promotion gates: the policy's thresholds and one small named function per gate, in GATES.

A gate reads the evaluation evidence that `advtrain evaluate` wrote as version tags (`eval.*`), compares
it with the policy and with the alias's current holder (the champion), and returns a `Gate`: its name,
whether it passed and the numbers behind the verdict, as `advtrain promote` prints them. Promotion
moves the alias only when every gate passes (pipeline.tracking.registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config.base import registered_name
from pipeline.config.loading import read_toml
from pipeline.tracking import model_store
from pipeline.tracking.runs import TrackingError

__all__ = ["GATES", "Gate", "GateInputs", "PromotionPolicy", "check_gates", "load_policy"]


class PromotionPolicy(BaseModel):
    """Gate thresholds (a TOML file with these keys; see jobs/configs/promotion.toml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
    protocol: str = Field(default="standard", description="Evidence must come from this evaluation protocol.")
    margin: float = Field(default=0.0, ge=0.0, le=1.0, description="Robust accuracy must beat the champion's by this.")
    clean_floor: float = Field(default=0.5, ge=0.0, le=1.0, description="Minimum clean accuracy.")
    require_sanity: bool = True
    min_examples: int = Field(default=100, ge=1, description="Evidence must cover at least this many examples.")

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        # A protocol no evaluation runs would refuse every version, whatever its evidence.
        from pipeline.evaluate import PROTOCOLS

        return registered_name(value, PROTOCOLS, "evaluation protocol")


def load_policy(path: str | Path | None) -> PromotionPolicy:
    """The policy in the TOML file at `path` (the defaults for None); TrackingError names a bad file."""
    if path is None:
        return PromotionPolicy()
    raw = read_toml(path, "promotion policy", hint="see jobs/configs/promotion.toml")
    try:
        return PromotionPolicy.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in err.errors())
        raise TrackingError(f"{path}: invalid promotion policy: {problems}") from None


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateInputs:
    """What every gate sees: the version to promote, the alias's current holder and the policy."""

    uri: str
    client: MlflowClient
    name: str
    version: ModelVersion
    champion: ModelVersion | None  # None: the alias points nowhere yet
    policy: PromotionPolicy

    @property
    def tags(self) -> dict[str, str]:
        return self.version.tags

    @property
    def has_evidence(self) -> bool:
        """An evaluation is on record (robust accuracy and the sha256 of the weights it evaluated)."""
        return "eval.robust_acc" in self.tags and "eval.weights_sha256" in self.tags

    @property
    def train_threat(self) -> tuple[str | None, str | None]:
        return self.tags.get("threat_model.norm"), self.tags.get("threat_model.eps")

    @property
    def eval_threat(self) -> tuple[str | None, str | None]:
        return self.tags.get("eval.norm"), self.tags.get("eval.eps")


GateCheck = Callable[[GateInputs], Gate]


def _same_threat(a: tuple, b: tuple) -> bool:
    # eps arrives as tag text ("0.2" vs "0.20"): compare it as a number; a missing one matches nothing.
    try:
        return a[0] == b[0] and abs(float(a[1]) - float(b[1])) < 1e-9
    except (TypeError, ValueError):
        return False


def _covers(evidence_protocol: str | None, required: str | None) -> bool:
    """Evidence from `evidence_protocol` stands in for `required`: the same protocol, or one that runs it
    and more (`minimal` runs `standard`'s cascade; its worst case can only be lower, so accepting it for
    a challenger never favours the challenger)."""
    from pipeline.evaluate import PROTOCOL_INCLUDES

    return evidence_protocol == required or required in PROTOCOL_INCLUDES.get(evidence_protocol or "", ())


def evidence(g: GateInputs) -> Gate:
    """An `advtrain evaluate` record with the policy's protocol and at least `min_examples` examples, at
    the threat model the version was trained for."""
    policy = g.policy
    if not g.has_evidence:
        return Gate(
            "evidence",
            False,
            f"no evaluation on record: run `advtrain evaluate --model models:/{g.name}/{g.version.version} "
            f"--protocol {policy.protocol}`",
        )
    n = int(g.tags.get("eval.num_examples", "0") or 0)
    (eval_norm, eval_eps), (train_norm, train_eps) = g.eval_threat, g.train_threat
    return Gate(
        "evidence",
        _covers(g.tags.get("eval.protocol"), policy.protocol)
        and n >= policy.min_examples
        and _same_threat(g.train_threat, g.eval_threat),
        f"protocol {g.tags.get('eval.protocol')} (policy: {policy.protocol}), {n} examples "
        f"(policy: >= {policy.min_examples}), evaluated at {eval_norm} eps={eval_eps} "
        f"(trained for {train_norm} eps={train_eps})",
    )


def weights_match_evidence(g: GateInputs) -> Gate:
    """The weights stored now are the ones evaluated and registered: their sha256 is computed from a fresh
    download, so a file changed after the evaluation is caught (tags alone are not trusted)."""
    tags = g.tags
    stored = model_store.stored_weights_sha256(g.uri, g.name, str(g.version.version))
    return Gate(
        "weights_match_evidence",
        stored == tags["eval.weights_sha256"] == tags.get("weights_sha256", stored),
        f"stored weights sha256 {stored[:16]}..., evaluated {tags['eval.weights_sha256'][:16]}..., "
        f"registered {tags.get('weights_sha256', '?')[:16]}...",
    )


def sanity_checks(g: GateInputs) -> Gate:
    """The evaluation's sanity checks (gradient masking, weak attacks) passed, where the policy asks."""
    sanity = g.tags.get("eval.sanity", "missing")
    required = g.policy.require_sanity
    return Gate(
        "sanity_checks",
        sanity == "passed" or not required,
        f"sanity checks {sanity}" + ("" if required else " (not required by policy)"),
    )


def beats_champion(g: GateInputs) -> Gate:
    """Robust accuracy >= the champion's + margin, both evaluated with the same protocol and threat model."""
    tags, champion, margin = g.tags, g.champion, g.policy.margin
    robust = float(tags["eval.robust_acc"])
    if champion is None:
        return Gate("beats_champion", True, f"robust accuracy {robust:.4f}; no current champion")
    if str(champion.version) == str(g.version.version):
        return Gate("beats_champion", False, f"version {g.version.version} is already the champion")
    ct = champion.tags
    eval_norm, eval_eps = g.eval_threat
    # Numbers from another protocol or threat model say nothing about which model is more robust:
    # refuse instead of comparing them.
    if not _covers(tags.get("eval.protocol"), ct.get("eval.protocol")) or not _same_threat(
        (ct.get("eval.norm"), ct.get("eval.eps")), g.eval_threat
    ):
        return Gate(
            "beats_champion",
            False,
            f"not comparable: champion v{champion.version} was evaluated with protocol "
            f"{ct.get('eval.protocol')} at {ct.get('eval.norm')} eps={ct.get('eval.eps')}, this one "
            f"with {tags.get('eval.protocol')} at {eval_norm} eps={eval_eps}",
        )
    best = float(ct["eval.robust_acc"])
    return Gate(
        "beats_champion",
        robust >= best + margin,
        f"robust accuracy {robust:.4f} vs champion v{champion.version} {best:.4f} + margin {margin:.4f}",
    )


def clean_floor(g: GateInputs) -> Gate:
    """Clean accuracy >= the policy's floor (a missing number is NaN, which fails)."""
    clean = float(g.tags.get("eval.clean_acc", "nan"))
    floor = g.policy.clean_floor
    return Gate("clean_floor", clean >= floor, f"clean accuracy {clean:.4f} vs floor {floor:.4f}")


# The registry, in report order. A new gate is a function here plus one entry (and a row in
# docs/registry.md); `advtrain promote` and the `promotion.gates` tag report whatever this holds. Every
# gate but `evidence` reads the evaluation's numbers, so it runs only where there is evidence.
GATES: dict[str, GateCheck] = {
    gate.__name__: gate
    for gate in (
        evidence,
        weights_match_evidence,
        sanity_checks,
        beats_champion,
        clean_floor,
    )
}


def check_gates(
    uri: str,
    client: MlflowClient,
    name: str,
    version: ModelVersion,
    champion: ModelVersion | None,
    policy: PromotionPolicy,
) -> list[Gate]:
    """Every gate in GATES, in order, for `version` of registered model `name` against `champion` (None
    when the alias points nowhere). Without evaluation evidence only `evidence` is reported (it says how
    to produce some). Reads the registry and downloads the stored weights; writes nothing."""
    inputs = GateInputs(uri, client, name, version, champion, policy)
    checks = GATES.values() if inputs.has_evidence else [evidence]
    gates = [check(inputs) for check in checks]
    assert [g.name for g in gates] == [c.__name__ for c in checks], "a gate must report under its registry name"
    return gates
