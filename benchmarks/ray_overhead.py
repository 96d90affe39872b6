"""Ray Train's cost over plain torch, the data path, worker scaling and start-up, measured in one run.

On a Fashion-MNIST subset (the first --train-examples of data/fashion-mnist, written to a temporary
Parquet dataset) with the fashion_mnist_fast recipe (FGSM-RS, small_cnn, batch 128), one epoch each:

    plain       the same Trainer in this process (fit_in_process), torch threads = --cpus (no Ray)
    ray-1x2     run_training through Ray Train: 1 worker with --cpus CPUs (same threads, same loop)
    ray-1x1     1 worker with 1 CPU, in-memory shards       } the data path: same worker, data in
    ray-data    1 worker with 1 CPU, Ray Data streaming     } memory vs streamed by Ray Data
    ray-2x1     2 workers with 1 CPU each (DDP over gloo)   } scaling vs ray-1x2

Rounds interleave the rows (plain, ray-1x2, ... , plain, ray-1x2, ...) and medians are kept. Each Ray
row is a whole `run_training` (MLflow run on a sqlite store, checkpoint, test metrics); only the
worker's own training-epoch time (`time/train_s`) enters the epoch ratios, and start-up is taken
apart from the run's `time/to_worker_s` / `time/worker_setup_s` metrics.

    .venv/bin/python benchmarks/ray_overhead.py [--train-examples 8192] [--rounds 2] [--json F] [--device cpu]

`--device cuda`: `plain` trains on the GPU and every Ray worker takes one (scaling.use_gpu = true), so
ray-2x1 needs two GPUs (it is refused with fewer: two workers on one GPU is not the scaling it measures).
Data loading and Ray Data stay on the CPUs. Epoch times come from `train_epoch`, which waits for the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices import add_device_option, describe  # noqa: E402

from pipeline import data as data_lib  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.training import fit_in_process  # noqa: E402


def _subset(source: Path, out: Path, train_examples: int) -> None:
    """The first `train_examples` training images of `source` (and 500 val / 500 test) as a new dataset."""
    info = data_lib.read_metadata(source)
    splits = {}
    for split, count in (("train", train_examples), ("val", 500), ("test", 500)):
        x, y = data_lib.load_split(str(source), split, max_examples=count)
        splits[split] = ((x.numpy() * 255).round().astype(np.uint8), y.numpy().astype(np.int64))
    data_lib.write_dataset(out, splits, class_names=info.class_names, source=f"{info.source} (first {train_examples})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    parser.add_argument("--recipe", default=str(ROOT / "jobs/configs/fashion_mnist_fast.toml"))
    parser.add_argument("--train-examples", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", default="")
    add_device_option(parser)
    args = parser.parse_args()
    if args.device.type == "cuda" and torch.cuda.device_count() < 2:
        parser.error(
            f"--device cuda: the ray-2x1 row needs 2 GPUs (one per worker), this machine has "
            f"{torch.cuda.device_count()}; use --device cpu"
        )

    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    data = work / "data"
    _subset(Path(args.data), data, args.train_examples)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

    common = [
        f'data.path="{data}"',
        f'run.storage_path="{work / "runs"}"',
        "run.epochs=1",
        'tracking.registered_model=""',
        'tracking.experiment="ray-overhead"',
        "validation.num_examples=200",
        "validation.num_steps=5",
    ]

    use_gpu = "true" if args.device.type == "cuda" else "false"

    def config(*extra: str):
        return load_config(args.recipe, overrides=[*common, f"scaling.use_gpu={use_gpu}", *extra])

    # Start-up pieces a user pays before any Ray work: the interpreter with our imports.
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.cli, pipeline.orchestrate.train"], check=True, cwd=ROOT)
    import_s = time.perf_counter() - started

    from pipeline.orchestrate.train import init_ray, run_training
    from pipeline.tracking.runs import metric_history

    started = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    ray_init_s = time.perf_counter() - started

    data_lib.validate_dataset(data)

    def plain() -> dict:
        torch.set_num_threads(args.cpus)
        _, _, reporter = fit_in_process(config(), device=args.device)
        epoch = reporter.metrics[1]
        return {"train_s": epoch["time/train_s"], "images_per_s": epoch["train/images_per_s"]}

    def on_ray(workers: int, cpus: float, loader: str = "memory") -> dict:
        cfg = config(f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}", f'data.loader="{loader}"')
        started = time.perf_counter()
        summary = run_training(cfg, config_name=f"bench-{workers}x{cpus:g}-{loader}")
        wall = time.perf_counter() - started

        def metric(key: str) -> float:
            return metric_history(summary.tracking_uri, summary.mlflow_run_id, key)[0][1]

        return {
            "train_s": metric("time/train_s"),
            "images_per_s": metric("train/images_per_s"),
            "to_worker_s": metric("time/to_worker_s"),
            "worker_setup_s": metric("time/worker_setup_s"),
            "run_wall_s": wall,
        }

    rows = {
        "plain": plain,
        "ray-1x2": lambda: on_ray(1, args.cpus),
        "ray-1x1": lambda: on_ray(1, 1),
        "ray-data": lambda: on_ray(1, 1, "ray_data"),
        "ray-2x1": lambda: on_ray(2, 1),
    }
    samples: dict[str, list[dict]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            samples[name].append(fn())
            print(f"  {name}: {samples[name][-1]}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    ratios = {
        "ray_epoch_over_plain": med("ray-1x2", "train_s") / med("plain", "train_s"),
        "ray_data_epoch_over_memory": med("ray-data", "train_s") / med("ray-1x1", "train_s"),
        "throughput_2x1_over_1x2": med("ray-2x1", "images_per_s") / med("ray-1x2", "images_per_s"),
    }
    startup = {
        "python_imports_s": import_s,
        "ray_init_s": ray_init_s,
        "run_start_to_worker_s": med("ray-1x2", "to_worker_s"),
        "worker_setup_s": med("ray-1x2", "worker_setup_s"),
    }
    print(
        f"# ray overhead: {args.train_examples} Fashion-MNIST train examples, fgsm_rs small_cnn, {args.cpus} CPUs, "
        f"device {describe(args.device)}, torch {torch.__version__}, {platform.machine()}; "
        f"medians of {args.rounds} rounds"
    )
    print("| row | train epoch s | images/s |\n|---|---:|---:|")
    for name in rows:
        print(f"| {name} | {med(name, 'train_s'):.1f} | {med(name, 'images_per_s'):.0f} |")
    print("| ratio | value |\n|---|---:|")
    for key, value in ratios.items():
        print(f"| {key} | **{value:.3f}** |")
    print("| start-up piece | seconds |\n|---|---:|")
    for key, value in startup.items():
        print(f"| {key} | {value:.1f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": describe(args.device), "samples": samples, "ratios": ratios, "startup": startup}, indent=1
            )
        )


if __name__ == "__main__":
    main()
