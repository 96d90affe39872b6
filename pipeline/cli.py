"""`advtrain` command line: the only place that reads argv and the environment."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from pipeline.data.sources import SOURCES
from pipeline.errors import InputError, checked_name
from pipeline.evaluate import PROTOCOLS

app = typer.Typer(
    help="advtrain: distributed adversarial training on Ray, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare and check datasets in advtrain's Parquet format.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(
    help="Look at the model registry (versions, aliases, evaluation evidence).", no_args_is_help=True
)
app.add_typer(models_app, name="models")


# The choices of `advtrain data prepare`: every entry of pipeline.data's source registry.
Source = StrEnum("Source", {name: name for name in SOURCES})


# Exit codes (README "Errors and exit codes"): 0 done, 1 a documented refusal (a promotion gate failed),
# 2 bad input (the message says what to change), 3 a bug (the traceback is in the log file named).
EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_BUG = 1, 2, 3


@data_app.command("prepare")
def data_prepare(
    kind: Annotated[
        Source,
        typer.Argument(help=", ".join(f"{name} ({spec.about})" for name, spec in SOURCES.items()) + "."),
    ],
    out: Annotated[Path, typer.Option(help="Output folder (metadata.json + train/val/test Parquet).")] = Path(""),
    source: Annotated[
        Path | None,
        typer.Option(help="; ".join(f"{name}: {spec.needs}" for name, spec in SOURCES.items() if spec.needs) + "."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the train/val split.")] = 0,
    size: Annotated[
        tuple[int, int] | None, typer.Option(help="images/parquet: resize and center-crop to H W pixels.")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="images/parquet: share of train carved out as val when none is given.")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="images/parquet: share of train carved out as test when none is given.")
    ] = None,
    image_column: Annotated[str | None, typer.Option(help="parquet: the encoded-image column.")] = None,
    label_column: Annotated[str | None, typer.Option(help="parquet: the label column.")] = None,
) -> None:
    """Write a dataset as validated Parquet shards with metadata and checksums.

    Examples: `advtrain data prepare digits --out data/digits`;
    `advtrain data prepare fashion-mnist --source /usr/share/datasets/fashion-mnist --out data/fashion-mnist`;
    `advtrain data prepare cifar10 --source ~/cifar-10-batches-py --out data/cifar10`;
    `advtrain data prepare npz --source my.npz --out data/mine`;
    `advtrain data prepare images --source photos/ --out data/photos --size 64 64`;
    `advtrain data prepare parquet --source train.parquet --out data/hf --image-column img --label-column label`.
    """
    from pipeline import data

    spec = SOURCES[kind.value]
    out = out if str(out) not in ("", ".") else Path("data") / kind.value
    if spec.needs and source is None:
        raise InputError(f"{kind.value} needs --source {spec.needs}")
    given = {
        "size": size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "image_column": image_column,
        "label_column": label_column,
    }
    given = {key: value for key, value in given.items() if value is not None}
    unused = [key for key in given if key not in spec.options]
    if unused:
        option = "--" + unused[0].replace("_", "-")
        raise InputError(f"{option} does not apply to {kind.value}; it takes {', '.join(spec.options) or 'no options'}")
    info = spec.prepare(source, out, seed=seed, **given)
    rows = ", ".join(f"{s} {info.num_rows(s)}" for s in data.SPLITS)
    typer.echo(f"wrote {out}: shape {info.shape}, {info.num_classes} classes, {rows}")


@data_app.command("validate")
def data_validate(path: Annotated[Path, typer.Argument(help="A prepared dataset folder.")]) -> None:
    """Check every file of a prepared dataset (schema, shape, labels, checksums)."""
    from pipeline import data

    info = data.validate_dataset(path)
    typer.echo(f"{path}: ok ({', '.join(f'{s} {info.num_rows(s)}' for s in data.SPLITS)} rows)")


@app.command("train")
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML run file, e.g. jobs/configs/digits_demo.toml.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, repeatable: --set attack.eps=0.2 --set run.epochs=5."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Resume the run with this name from its last checkpoint (must exist).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to use (else RAY_ADDRESS, else a local Ray instance).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(min=1, max=4096, help="CPUs of a local Ray instance (default: all).")
    ] = None,
) -> None:
    """Adversarial training on Ray Train, tracked in MLflow; registers the model at the end.

    Example: `advtrain train --config jobs/configs/digits_demo.toml --set attack.eps=0.2`.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.config import load_config

    cfg = load_config(config, overrides or [])
    if resume is not None:
        checked_name(resume, "--resume")
    from pipeline.orchestrate import train as train_lib

    summary = train_lib.run_training(
        cfg, config_name=config.stem, resume=resume, ray_address=ray_address, num_cpus=num_cpus
    )
    ui = (
        f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {summary.tracking_uri}"
        if summary.tracking_uri.startswith("sqlite")
        else f"open {summary.tracking_uri}"
    )
    version = (
        f"{summary.registered_model} version {summary.model_version}"
        if summary.model_version is not None
        else "(not registered: tracking.registered_model is empty)"
    )
    typer.echo(
        "\n".join(
            [
                "",
                f"run {summary.run_name} finished in {summary.seconds:.0f}s{' (resumed)' if summary.resumed else ''}",
                f"  val   clean acc {summary.val_clean_acc:.4f}   robust acc {summary.val_robust_acc:.4f}"
                f"  ({cfg.attack.norm} eps={cfg.attack.eps}, PGD-{cfg.validation.num_steps};"
                f" epoch {summary.registered_epoch} of {summary.epochs}, the one registered)",
                f"  test  clean acc {summary.test_clean_acc:.4f}   robust acc {summary.test_robust_acc:.4f}",
                f"  MLflow run     {summary.mlflow_run_id}",
                f"  model          {version}  sha256 {summary.weights_sha256[:16]}...",
                f"  checkpoints    {summary.storage}",
                f"  look at it     {ui}",
            ]
        )
    )


@app.command("tune")
def tune_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML run file the search varies.")],
    search: Annotated[
        Path, typer.Option("--search", "-s", help="TOML search file, e.g. jobs/configs/search_digits.toml.")
    ],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a run-config key for every trial, repeatable.")
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="Trials (overrides [search] num_samples).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Search name (default: a unique one); --resume needs it.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the interrupted search --name; finished trials are kept.")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to use (else RAY_ADDRESS, else a local Ray instance).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(min=1, max=4096, help="CPUs of a local Ray instance (default: all).")
    ] = None,
) -> None:
    """Ray Tune search over the run config's keys: each trial a distributed training run, ASHA on the
    robust objective, one MLflow parent run with a child per trial; writes the best config as TOML.

    Example: `advtrain tune --config jobs/configs/digits_demo.toml --search jobs/configs/search_digits.toml`.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.config import load_config
    from pipeline.orchestrate import tune as tune_lib
    from pipeline.orchestrate.cluster import init_ray

    cfg = load_config(config, overrides or [])
    spec = tune_lib.load_search(search, cfg, num_samples=num_samples)
    if name is not None:
        checked_name(name, "--name")
        if len(name) > tune_lib.MAX_SEARCH_NAME:
            raise InputError(f"--name is {len(name)} characters; a search name has at most {tune_lib.MAX_SEARCH_NAME}")
    init_ray(ray_address, num_cpus=num_cpus)
    summary = tune_lib.run_search(cfg, spec, name=name, resume=resume, config_name=f"{config.stem}-search")
    typer.echo("")
    typer.echo(tune_lib.format_table(summary))
    typer.echo("")
    typer.echo(f"search {summary.name} finished in {summary.seconds:.0f}s; MLflow parent run {summary.parent_run_id}")
    if summary.best:
        typer.echo(f"  best trial     {summary.best.trial_id} (best-epoch objective {summary.best_objective:.4f})")
        typer.echo(f"  best config    {summary.best_config_path}")
        typer.echo(f"  train it       advtrain train --config {summary.best_config_path}")
    if summary.registered_version is not None:
        typer.echo(f"  registered     {cfg.tracking.registered_model} version {summary.registered_version}")


# The CLI's choices are the registry's names: a protocol added to PROTOCOLS is an option here.
Protocol = StrEnum("Protocol", {name: name for name in PROTOCOLS})


class NormChoice(StrEnum):
    linf = "linf"
    l2 = "l2"


@app.command("evaluate")
def evaluate(
    model: Annotated[
        str,
        typer.Option(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a local model folder; or, with "
            "--weights, a built-in name or your package.module:function."
        ),
    ],
    weights: Annotated[
        Path | None, typer.Option(help="A .safetensors file: evaluate --model built with these weights.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="With --weights: model.* keys, e.g. --set model.kwargs.depth=3."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Prepared dataset folder (default: the data.path the model was trained on).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on: test, val or train.")] = "test",
    norm: Annotated[NormChoice | None, typer.Option(help="Threat model norm (default: the training attack's).")] = None,
    eps: Annotated[float | None, typer.Option(help="Radius in pixel space [0,1] (default: the training eps).")] = None,
    num_examples: Annotated[int, typer.Option(help="First N examples of the split (0 = all).")] = 1000,
    protocol: Annotated[
        Protocol,
        typer.Option(help="fast (APGD-CE + APGD-T/3), standard (AutoAttack-style ensemble + sanity checks), pgd."),
    ] = Protocol.standard,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1, help="Seed of the attacks' random starts.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: reports/<model>-<protocol>-...).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster (else RAY_ADDRESS, else local).")] = None,
) -> None:
    """Robust accuracy under an attack ensemble, sharded over Ray, with sanity checks and a report.

    Examples: `advtrain evaluate --model models:/digits-linf@champion --protocol standard`;
    `advtrain evaluate --model mynets.cnn:build --weights cnn.safetensors --data data/mine --norm linf --eps 0.1`.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from pipeline.evaluate import summary_text
    from pipeline.orchestrate.evaluation import run_evaluation

    rep = run_evaluation(
        model,
        data_path=str(data) if data else None,
        split=split,
        norm=norm.value if norm else None,
        eps=eps,
        num_examples=num_examples,
        protocol=protocol.value,
        seed=seed,
        out_dir=out,
        ray_address=ray_address,
        weights=str(weights) if weights else None,
        overrides=overrides or [],
    )
    typer.echo(summary_text(model, rep))


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


def run(argv: list[str] | None = None, *, prog_name: str = "advtrain") -> int:
    """Every command's one error path; the exit code. Bad input -> its message, 2; anything else is a
    bug -> 3, with the traceback in a log file whose path the message gives."""
    # MLflow draws a progress bar per artifact download; the CLI has its own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        # Without standalone mode, typer returns the code of a `typer.Exit` (a refused promotion: 1).
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:  # Ctrl-C at a prompt
        return 130
    except TyperException as usage:  # a usage error: unknown option, bad choice, missing value
        message = str(usage)
        getattr(usage, "show", lambda: typer.secho(f"error: {message}", err=True))()
        return EXIT_BAD_INPUT
    except InputError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return EXIT_BAD_INPUT
    except Exception:  # by definition unexpected: reported as a bug, never as bad input
        log_path = _write_crash_log(traceback.format_exc())
        typer.secho(
            f"error: advtrain failed unexpectedly (a bug, not your input): {sys.exc_info()[1]!r}\n"
            f"The traceback is in {log_path}; please attach it to a bug report.",
            fg=typer.colors.RED,
            err=True,
        )
        return EXIT_BUG


def main() -> None:
    sys.exit(run())


def _write_crash_log(text: str) -> Path:
    folder = Path(os.environ.get("ADVTRAIN_LOG_DIR") or tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="advtrain-crash-", suffix=".log", dir=folder)
    except OSError:  # an unwritable ADVTRAIN_LOG_DIR must not hide the bug being reported
        handle, name = tempfile.mkstemp(prefix="advtrain-crash-", suffix=".log")
    with os.fdopen(handle, "w") as out:
        out.write(f"advtrain {' '.join(sys.argv[1:])}\n\n{text}")
    return Path(name)


if __name__ == "__main__":
    sys.exit(main())
