"""`advtrain models list|show|register`, `promote`, `rollback`: the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import EXIT_REFUSED, app, models_app
from pipeline.cli.run_commands import NormChoice


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Argument(help="A registered model (default: all).")] = None) -> None:
    """Versions with aliases, clean / robust accuracy, protocol, sanity and creation time.

    Example: `advtrain models list digits-linf`.
    """
    from pipeline.tracking.registry import list_versions

    rows = list_versions(name)
    if not rows:
        typer.echo("no registered models")
        return
    header = (
        f"{'name':20s} {'ver':>4s} {'aliases':24s} {'threat model':16s} {'clean':>6s} {'robust':>6s} "
        f"{'protocol':9s} {'sanity':7s} created"
    )
    typer.echo(header)
    for r in rows:
        clean = r["eval.clean_acc"] or r["test_clean_acc"]
        typer.echo(
            f"{r['name']:20s} {r['version']:>4s} {','.join(r['aliases']) or '-':24s} {r['threat_model']:16s} "
            f"{_num(clean):>6s} {_num(r['eval.robust_acc']):>6s} {r['eval.protocol'] or '-':9s} "
            f"{r['eval.sanity'] or '-':7s} {r['created']}"
        )


def _num(value: str | None) -> str:
    return f"{float(value):.4f}" if value not in (None, "") else "-"


@models_app.command("register")
def models_register(
    model: Annotated[str, typer.Option(help="A built-in name or your package.module:function.")],
    weights: Annotated[Path, typer.Option(help="The model's weights, a .safetensors file.")],
    name: Annotated[str, typer.Option(help="Registered model name (a new version is added).")],
    data: Annotated[Path, typer.Option(help="The prepared dataset the model classifies (shape, classes).")],
    norm: Annotated[NormChoice, typer.Option(help="Threat model norm the model is meant to resist.")],
    eps: Annotated[float, typer.Option(help="Threat model radius in pixel space [0,1].")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="model.* keys, e.g. --set model.kwargs.depth=3.")
    ] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at the new version (e.g. challenger).")] = "",
) -> None:
    """Register a model advtrain did not train, with its code, so evaluate and promote work on it.

    Example: `advtrain models register --model mynets.cnn:build --weights cnn.safetensors --name mine
    --data data/mine --norm linf --eps 0.1 --alias challenger`.
    """
    from pipeline.orchestrate.registration import register_external_model

    out = register_external_model(
        model,
        str(weights),
        data_path=str(data),
        registered_model=name,
        norm=norm.value,
        eps=eps,
        overrides=overrides or [],
        alias=alias,
    )
    typer.echo(f"registered {name} version {out['version']} (sha256 {out['weights_sha256'][:16]}...)")


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME, NAME/VERSION or NAME@ALIAS.")]) -> None:
    """One registered model (aliases, promotion history) or one version (all its tags), as JSON.

    Example: `advtrain models show digits-linf@champion`.
    """
    import json

    from pipeline.tracking.registry import show

    typer.echo(json.dumps(show(ref), indent=2))


@app.command("promote")
def promote(
    name: Annotated[str, typer.Option(help="Registered model name.")],
    version: Annotated[str, typer.Option(help="Version number, or an alias such as challenger.")],
    alias: Annotated[str, typer.Option(help="Alias to move when every gate passes.")] = "champion",
    policy: Annotated[
        Path | None, typer.Option(help="Gate thresholds (TOML), e.g. jobs/configs/promotion.toml.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Check and report the gates; change nothing.")] = False,
    evaluate_first: Annotated[
        bool, typer.Option("--evaluate", help="Run `advtrain evaluate` first when the version has no evidence.")
    ] = False,
) -> None:
    """Move `champion` to a version only if it passes every gate; print every gate with its numbers.

    Gates: evaluation evidence (policy protocol, same threat model), weights sha256 unchanged since the
    evaluation, sanity checks passed, robust accuracy >= champion's + margin, clean accuracy >= floor.
    Exit code 1 and an unchanged registry when any gate fails. Example:
    `advtrain promote --name digits-linf --version challenger`.
    """
    from pipeline.tracking import registry

    registry.check_promotion_request(name, version, alias)  # before --evaluate writes any evidence
    rules = registry.load_policy(policy)
    if evaluate_first:
        _evaluate_if_missing(name, version, rules.protocol)
    result = registry.promote(name, version, alias=alias, policy=rules, dry_run=dry_run)
    for gate in result.gates:
        typer.echo(f"  {'pass' if gate.passed else 'FAIL'}  {gate.name:24s} {gate.detail}")
    passed = all(g.passed for g in result.gates)
    if result.promoted:
        previous = (
            f" (previous champion v{result.previous_champion} is now previous-champion)"
            if result.previous_champion and alias == "champion"
            else ""
        )
        typer.echo(f"promoted {name} version {result.version} to '{alias}'{previous}")
    elif dry_run:
        typer.echo(
            f"dry run: {name} version {result.version} {'would be' if passed else 'would NOT be'} promoted to '{alias}'"
        )
    else:
        failed = ", ".join(g.name for g in result.gates if not g.passed)
        typer.echo(f"refused: {name} version {result.version} stays as it is ({failed} failed); registry unchanged")
    if not passed:
        raise typer.Exit(EXIT_REFUSED)


def _evaluate_if_missing(name: str, version: str, protocol: str) -> None:
    from pipeline.orchestrate.cluster import init_ray
    from pipeline.orchestrate.evaluation import run_evaluation
    from pipeline.tracking import registry

    ref = f"{name}/{version}" if registry.VERSION_NUMBER.fullmatch(version) else f"{name}@{version}"
    row = registry.show(ref)
    if row["tags"].get("eval.protocol") == protocol and "eval.robust_acc" in row["tags"]:
        return
    typer.echo(f"no {protocol} evaluation on record for {ref}: evaluating first")
    init_ray(None)
    run_evaluation(f"models:/{name}/{row['version']}", protocol=protocol)


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to move back.")] = "champion",
) -> None:
    """Move `champion` back to the version it replaced; the rollback is recorded in the history.

    Example: `advtrain rollback --name digits-linf`.
    """
    from pipeline.tracking.registry import rollback as do_rollback

    record = do_rollback(name, alias=alias)
    typer.echo(f"rolled back {name}: '{alias}' is version {record['version']} again (was {record['previous']})")
