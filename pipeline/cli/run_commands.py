"""`advtrain train|tune|evaluate`: the commands that run on Ray."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import app
from pipeline.errors import InputError, checked_name
from pipeline.evaluate import PROTOCOLS

# Options train and tune share.
RayAddress = Annotated[
    str | None, typer.Option(help="Ray cluster to use (else RAY_ADDRESS, else a local Ray instance).")
]
NumCpus = Annotated[int | None, typer.Option(min=1, max=4096, help="CPUs of a local Ray instance (default: all).")]


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
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
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
    ray_address: RayAddress = None,
    num_cpus: NumCpus = None,
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


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
        typer.Option(
            help="fast (APGD-CE + APGD-T/3), standard (AutoAttack's: APGD-CE, APGD-T, FAB-T, Square + sanity checks), "
            "pgd, minimal (standard + each example's smallest perturbation by DeepFool, FMN, FAB-T and, for l2, C&W)."
        ),
    ] = Protocol.standard,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1, help="Seed of the attacks' random starts.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: reports/<model>-<protocol>-...).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster (else RAY_ADDRESS, else local).")] = None,
    transfer_from: Annotated[
        str | None,
        typer.Option(help="A surrogate model URI: its PGD and MI-FGSM examples at the same eps, scored on --model."),
    ] = None,
    device: Annotated[
        DeviceChoice, typer.Option(help="auto: GPU tasks where the Ray cluster has GPUs, else CPU tasks.")
    ] = DeviceChoice.auto,
    chunk_size: Annotated[
        int | None, typer.Option(help="Examples per Ray task (default 64 on CPUs, 500 on GPUs); seeds follow chunks.")
    ] = None,
    deterministic: Annotated[
        bool, typer.Option(help="Deterministic kernels: the same numbers on every run on one GPU (slower).")
    ] = False,
) -> None:
    """Robust accuracy under an attack ensemble, sharded over Ray, with sanity checks and a report.

    Examples: `advtrain evaluate --model models:/digits-linf@champion --protocol standard`;
    `advtrain evaluate --model mynets.cnn:build --weights cnn.safetensors --data data/mine --norm linf --eps 0.1`.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from pipeline.evaluation_report import summary_text
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
        transfer_from=transfer_from,
        device=device.value,
        chunk_size=chunk_size,
        deterministic=deterministic,
    )
    typer.echo(summary_text(model, rep))
