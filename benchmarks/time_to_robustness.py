"""Time to robustness: how long each method's Fashion-MNIST recipe trains before its validation PGD-20
robust accuracy first reaches a target (default 70% on the first 1,000 validation examples, eps 0.1).

Each recipe (jobs/configs/fashion_mnist_<name>.toml: its method, attack, eps ramp, LR schedule and
epochs) trains in this process through the driver Ray workers run (`Trainer`, via fit_in_process),
one worker's worth of work with --threads threads, no Ray. Every --eval-every training steps the
model is evaluated (PGD-20, step 2.5 eps / 20, one random start, fixed seed); evaluation time is not
counted. A recipe stops at the target, at the end of its schedule, or at --budget-min of training.

Two times are printed per method: the training seconds measured, and the same amount of work priced
at the run's median step time (steps x median ms). The second is what the ranking uses: a burst of
other load on a shared machine inflates a few steps, not the median.

    .venv/bin/python benchmarks/time_to_robustness.py [--target 0.70] [--budget-min 12] [--json F] [--device cpu]

`--device cuda` trains and evaluates on the GPU; step times are then the synchronised ones `train_epoch`
reports to `on_step` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from devices import add_device_option, describe

from pipeline import data as data_lib
from pipeline.config import load_config
from pipeline.training import fit_in_process
from pipeline.training.validation import pgd20_correct

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("fast", "free", "pgd", "trades", "mart")


def run_recipe(recipe: str, args: argparse.Namespace, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
    config = load_config(ROOT / f"jobs/configs/fashion_mnist_{recipe}.toml", overrides=[f'data.path="{args.data}"'])
    info = data_lib.validate_dataset(args.data)
    device = args.device
    steps_per_epoch = -(-info.num_rows("train") // config.data.batch_size)
    trace: list[dict] = []
    step_ms: list[float] = []
    train_s = 0.0
    steps = 0

    def after_step(epoch: int, step: int, seconds: float, model: torch.nn.Module) -> bool:
        """Count the step; every --eval-every steps and at each epoch's end evaluate (not timed) and
        say whether to stop: target reached or training budget spent."""
        nonlocal train_s, steps
        train_s += seconds
        step_ms.append(1000 * seconds)
        steps += 1
        if (step + 1) % args.eval_every and step + 1 != steps_per_epoch:
            return False
        val = pgd20_correct(model, x_val, y_val, eps=config.attack.eps, norm=config.attack.norm, device=device)
        point = {
            "epoch": round(epoch - 1 + (step + 1) / steps_per_epoch, 3),
            "steps": steps,
            "train_s": round(train_s, 1),
            "clean": val["clean_correct"] / val["count"],
            "robust": val["robust_correct"] / val["count"],
        }
        trace.append(point)
        print(f"  {recipe}: {point}", flush=True)
        return point["robust"] >= args.target or train_s > 60 * args.budget_min

    fit_in_process(config, device=device, on_step=after_step)
    reached = next((p for p in trace if p["robust"] >= args.target), None)
    median_ms = statistics.median(step_ms)
    return {
        "recipe": recipe,
        "device": describe(device),
        "method": config.method.name,
        "median_step_ms": round(median_ms, 1),
        "reached": reached is not None,
        "steps": reached["steps"] if reached else steps,
        "train_s": reached["train_s"] if reached else round(train_s, 1),
        "priced_s": round((reached["steps"] if reached else steps) * median_ms / 1000, 1),
        "best_robust": max(p["robust"] for p in trace),
        "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--eval-every", type=int, default=108, help="training steps between evaluations")
    parser.add_argument("--budget-min", type=float, default=12.0, help="training minutes per recipe at most")
    parser.add_argument("--val-examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="")
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_val, y_val = data_lib.load_split(args.data, "val", max_examples=args.val_examples)
    started = time.perf_counter()
    results = [run_recipe(recipe, args, x_val, y_val) for recipe in args.recipes]
    results.sort(key=lambda r: (not r["reached"], r["priced_s"]))
    print(
        f"# time to {args.target:.0%} PGD-20 robust accuracy (first {args.val_examples} val examples, eps 0.1), "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}, device {describe(args.device)}; "
        f"whole run {time.perf_counter() - started:.0f} s"
    )
    print("| rank | recipe | method | reached | steps | median step ms | priced min | measured min | best robust |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|")
    for rank, r in enumerate(results, 1):
        print(
            f"| {rank} | {r['recipe']} | {r['method']} | {'yes' if r['reached'] else 'no'} | {r['steps']} "
            f"| {r['median_step_ms']:.0f} | {r['priced_s'] / 60:.1f} | {r['train_s'] / 60:.1f} "
            f"| {r['best_robust']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
