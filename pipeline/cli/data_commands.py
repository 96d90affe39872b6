"""`advtrain data prepare|validate`: datasets in advtrain's Parquet format."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import data_app
from pipeline.data.sources import SOURCES
from pipeline.errors import InputError

# The choices of `advtrain data prepare`: every entry of pipeline.data's source registry.
Source = StrEnum("Source", {name: name for name in SOURCES})


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
