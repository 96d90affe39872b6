"""Streaming (Ray Data) vs in-memory training on the same encoded image dataset, through Ray Train.

An image dataset (the first N Fashion-MNIST training images written as PNG/JPEG class folders with
Pillow, prepared with `prepare images`: encoded bytes on disk) is trained on by one Ray Train worker
with 1 CPU, once with data.loader = memory (the whole train split decoded into the worker as float32)
and once with data.loader = ray_data (Ray Data's tasks on
the other CPU decode in map_batches; the worker takes prefetched uint8 batches). Printed: train images/s
of each (epochs after the first, whose start-up is not the steady state) and their ratio (goal >= 0.8);
and the worker's peak resident memory (`sys/peak_rss_mb`) streaming datasets of N and 2N images, both
over 4x data.memory_limit_mb, against the in-memory loader's: bounded means it does not grow with N.

    .venv/bin/python benchmarks/streaming_vs_memory.py [--images 10000] [--method fgsm_rs] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.data.image_sources import prepare_images
from pipeline.orchestrate.train import init_ray, run_training
from pipeline.tracking.runs import client_for

ROOT = Path(__file__).resolve().parents[1]


def write_images(source: str, root: Path, count: int) -> Path:
    """The first `count` images of a prepared dataset's train split as class folders, PNG and JPEG
    alternately (real images: a synthetic set that is learnt perfectly drives the loss to 0, where
    denormal arithmetic, not data loading, sets the speed)."""
    x, y = load_split(source, "train", max_examples=count)
    pixels = (x * 255).round().to(torch.uint8).numpy()
    for i in range(len(y)):
        folder = root / f"class{int(y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels[i, 0])
        image.save(folder / f"{i:06d}.png") if i % 2 else image.save(folder / f"{i:06d}.jpg", quality=92)
    return root


def train(data: Path, loader: str, args, tmp: Path, name: str) -> dict:
    config = load_config(
        ROOT / "jobs/configs/fashion_mnist_fast.toml",
        [
            f'data.path="{data}"',
            f'data.loader="{loader}"',
            f"data.memory_limit_mb={args.memory_limit_mb}",
            f"data.batch_size={args.batch_size}",
            f'method.name="{args.method}"',
            f"run.epochs={args.epochs}",
            f'run.name="{name}"',
            f'run.storage_path="{tmp / "runs"}"',
            "validation.num_examples=200",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            f'tracking.uri="sqlite:///{tmp / "mlflow.db"}"',
            'tracking.registered_model=""',
            'tracking.experiment="streaming-benchmark"',
        ],
    )
    summary = run_training(config, config_name=name)
    client = client_for(summary.tracking_uri)
    history = {
        k: [m.value for m in sorted(client.get_metric_history(summary.mlflow_run_id, k), key=lambda m: m.step)]
        for k in ("train/images_per_s", "sys/peak_rss_mb")
    }
    return {
        "loader": loader,
        "images_per_s": statistics.median(history["train/images_per_s"][1:]),
        "peak_rss_mb": max(history["sys/peak_rss_mb"]),
        "val_clean": summary.val_clean_acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"), help="where the images come from")
    parser.add_argument("--images", type=int, default=10000, help="N: the smaller dataset's image count")
    parser.add_argument("--method", default="fgsm_rs", choices=["fgsm_rs", "standard"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    float_mb = args.images * 0.7 * 28 * 28 * 4 / 2**20  # the train split (70% of N) as float32
    args.memory_limit_mb = round(float_mb / 4, 2)  # N's split is 4x the limit, 2N's 8x
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="advtrain-streaming-"))
    try:
        init_ray(num_cpus=2)
        rows = {}
        for count in (args.images, 2 * args.images):
            data = tmp / f"data-{count}"
            images = write_images(args.data, tmp / f"images-{count}", count)
            prepare_images(images, data, val_fraction=0.1, test_fraction=0.2)
            for loader in ("memory", "ray_data"):
                rows[(count, loader)] = train(data, loader, args, tmp, f"{loader}-{count}")
                print(f"  N={count} {loader}: {rows[(count, loader)]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n, n2 = args.images, 2 * args.images
    ratio = rows[(n, "ray_data")]["images_per_s"] / rows[(n, "memory")]["images_per_s"]
    print(
        f"# streaming vs in-memory, 32x32 RGB encoded images, method {args.method}, 1 worker x 1 CPU + 1 CPU "
        f"for Ray Data; data.memory_limit_mb {args.memory_limit_mb}; {platform.machine()}; "
        f"whole run {time.perf_counter() - started:.0f} s"
    )
    print("| images (train split as float32) | loader | images/s | worker peak RSS MiB | val clean |")
    print("|---|---|---:|---:|---:|")
    for (count, loader), r in rows.items():
        print(
            f"| {count} ({count * 0.7 * 12288 / 2**20:.0f} MiB) | {loader} | {r['images_per_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['val_clean']:.3f} |"
        )
    growth_stream = rows[(n2, "ray_data")]["peak_rss_mb"] - rows[(n, "ray_data")]["peak_rss_mb"]
    growth_memory = rows[(n2, "memory")]["peak_rss_mb"] - rows[(n, "memory")]["peak_rss_mb"]
    print(
        f"streaming / in-memory images/s at N={n}: {ratio:.3f} (goal >= 0.8); worker peak RSS growth N -> 2N: "
        f"streaming {growth_stream:+.0f} MiB, in-memory {growth_memory:+.0f} MiB"
    )
    if args.json:
        out = {f"{c}-{loader}": r for (c, loader), r in rows.items()}
        Path(args.json).write_text(
            json.dumps({"rows": out, "ratio": ratio, "memory_limit_mb": args.memory_limit_mb}, indent=1)
        )


if __name__ == "__main__":
    main()
