"""Streaming (Ray Data) vs in-memory training on the same encoded image dataset, through Ray Train.

An image dataset (the first N Fashion-MNIST training images written as PNG/JPEG class folders with
Pillow, prepared with `prepare images`: encoded bytes on disk) is trained on by one Ray Train worker
with 1 CPU, once with data.loader = memory (the whole train split decoded into the worker as float32)
and once with data.loader = ray_data (Ray Data's tasks on
the other CPU decode in map_batches; the worker takes prefetched uint8 batches). Printed: train images/s
of each (epochs after the first, whose start-up is not the steady state) and their ratio (goal >= 0.8), on
28x28 images with FGSM-RS; and the worker's peak resident memory (`sys/peak_rss_mb`) on datasets of N
and 2N 56x56 images (the train split 4x and 8x data.memory_limit_mb as float32), one epoch of standard
training each, streamed and in memory: bounded means it does not grow with N.

    .venv/bin/python benchmarks/streaming_vs_memory.py [--images 10000] [--memory-images 16000] [--json F] \
        [--device cpu]

`--device cuda`: the worker trains on a GPU (scaling.use_gpu = true); decoding, Ray Data and the memory
limit stay on the host, which is what this measures.
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
from devices import add_device_option, describe
from PIL import Image

from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.data.image_sources import prepare_images
from pipeline.orchestrate.train import init_ray, run_training
from pipeline.tracking.runs import client_for

ROOT = Path(__file__).resolve().parents[1]


def write_images(source: str, root: Path, count: int) -> Path:
    """`count` images of a prepared dataset's train split (cycled when it has fewer) as class folders,
    PNG and JPEG alternately. Real images: a synthetic set that is learnt perfectly drives the loss to 0,
    where denormal arithmetic, not data loading, sets the speed."""
    x, y = load_split(source, "train", max_examples=count)
    pixels = (x * 255).round().to(torch.uint8).numpy()
    for i in range(count):
        j = i % len(y)
        folder = root / f"class{int(y[j])}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels[j, 0])
        image.save(folder / f"{i:06d}.png") if i % 2 else image.save(folder / f"{i:06d}.jpg", quality=92)
    return root


def train(data: Path, loader: str, args, tmp: Path, *, name: str, method: str, epochs: int, limit_mb: float) -> dict:
    config = load_config(
        ROOT / "jobs/configs/fashion_mnist_fast.toml",
        [
            f'data.path="{data}"',
            f'data.loader="{loader}"',
            f"data.memory_limit_mb={limit_mb}",
            f"data.batch_size={args.batch_size}",
            f'method.name="{method}"',
            f"run.epochs={epochs}",
            f'run.name="{name}"',
            f'run.storage_path="{tmp / "runs"}"',
            "validation.num_examples=200",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            f"scaling.use_gpu={'true' if args.device.type == 'cuda' else 'false'}",
            f'tracking.uri="sqlite:///{tmp / "mlflow.db"}"',
            'tracking.registered_model=""',
            'tracking.experiment="streaming-benchmark"',
        ],
    )
    summary = run_training(config, config_name=name)
    client = client_for(summary.tracking_uri)
    history = {
        key: [m.value for m in sorted(client.get_metric_history(summary.mlflow_run_id, key), key=lambda m: m.step)]
        for key in ("train/images_per_s", "sys/peak_rss_mb")
    }
    speeds = history["train/images_per_s"]
    return {
        "loader": loader,
        "images_per_s": statistics.median(speeds[1:] or speeds),  # after the first epoch's start-up
        "peak_rss_mb": max(history["sys/peak_rss_mb"]),
        "val_clean": summary.val_clean_acc,
    }


def dataset(args, tmp: Path, count: int, size: int) -> tuple[Path, float]:
    """A prepared image dataset of `count` images at size x size; its train split's size as float32, MiB."""
    images = write_images(args.data, tmp / f"images-{count}-{size}", count)
    resize = None if size == 28 else (size, size)  # 28x28 keeps the PNG and JPEG bytes as they are
    info = prepare_images(images, tmp / f"data-{count}-{size}", size=resize, val_fraction=0.1, test_fraction=0.2)
    shutil.rmtree(images)
    return info.path, info.num_rows("train") * size * size * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"), help="where the images come from")
    parser.add_argument("--images", type=int, default=10000, help="speed: images (28x28) of the dataset")
    parser.add_argument("--memory-images", type=int, default=16000, help="memory: N, images (56x56) of the smaller")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", default="")
    add_device_option(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="advtrain-streaming-"))
    rows: dict[str, dict] = {}
    try:
        init_ray(num_cpus=2)
        data, float_mb = dataset(args, tmp, args.images, 28)
        for loader in ("memory", "ray_data"):
            run = dict(name=f"speed-{loader}", method="fgsm_rs", epochs=args.epochs, limit_mb=round(float_mb / 4, 3))
            rows[f"speed {loader}"] = {**train(data, loader, args, tmp, **run), "images": args.images, "mib": float_mb}
            print(f"  {rows[f'speed {loader}']}", flush=True)
        n = args.memory_images
        limit = None
        for count in (n, 2 * n):
            data, float_mb = dataset(args, tmp, count, 56)
            limit = limit or round(float_mb / 4, 3)  # N's train split is 4x the limit, 2N's 8x
            for loader in ("ray_data", "memory"):
                run = dict(name=f"memory-{loader}-{count}", method="standard", epochs=1, limit_mb=limit)
                rows[f"memory {loader} {count}"] = {
                    **train(data, loader, args, tmp, **run),
                    "images": count,
                    "mib": float_mb,
                }
                print(f"  {rows[f'memory {loader} {count}']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args, limit, started)


def report(rows: dict[str, dict], args, limit: float, started: float) -> None:
    ratio = rows["speed ray_data"]["images_per_s"] / rows["speed memory"]["images_per_s"]
    n = args.memory_images
    print(
        f"# streaming vs in-memory, Fashion-MNIST as PNG/JPEG files; 1 Ray Train worker x 1 CPU, 1 CPU for Ray "
        f"Data; {platform.machine()}, device {describe(args.device)}; whole run {time.perf_counter() - started:.0f} s"
    )
    print("| part | images (train split as float32) | loader | images/s | worker peak RSS MiB | val clean |")
    print("|---|---|---|---:|---:|---:|")
    for key, r in rows.items():
        part = "speed: 28x28, fgsm_rs" if key.startswith("speed") else f"memory: 56x56, standard, limit {limit} MiB"
        print(
            f"| {part} | {r['images']} ({r['mib']:.0f} MiB) | {r['loader']} | {r['images_per_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['val_clean']:.3f} |"
        )
    growth = {
        loader: rows[f"memory {loader} {2 * n}"]["peak_rss_mb"] - rows[f"memory {loader} {n}"]["peak_rss_mb"]
        for loader in ("ray_data", "memory")
    }
    print(
        f"streaming / in-memory images/s: {ratio:.3f} (goal >= 0.8); worker peak RSS from N={n} to 2N: streaming "
        f"{growth['ray_data']:+.0f} MiB, in-memory {growth['memory']:+.0f} MiB"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": describe(args.device), "rows": rows, "ratio": ratio, "rss_growth_mib": growth}, indent=1
            )
        )


if __name__ == "__main__":
    main()
