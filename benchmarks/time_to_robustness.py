"""Time to robustness: how long each method's Fashion-MNIST recipe trains before its validation PGD-20
robust accuracy first reaches a target (default 70% on the first 1,000 validation examples, eps 0.1).

Each recipe (jobs/configs/fashion_mnist_<name>.toml: its method, attack, eps ramp, LR schedule and
epochs) trains in this process through the training loop Ray workers run (pipeline.loop.train_epoch),
one worker's worth of work with --threads threads, no Ray. Every --eval-every training steps the
model is evaluated (PGD-20, step 2.5 eps / 20, one random start, fixed seed); evaluation time is not
counted. A recipe stops at the target, at the end of its schedule, or at --budget-min of training.

Two times are printed per method: the training seconds measured, and the same amount of work priced
at the run's median step time (steps x median ms). The second is what the ranking uses: a burst of
other load on a shared machine inflates a few steps, not the median.

    .venv/bin/python benchmarks/time_to_robustness.py [--target 0.70] [--budget-min 12] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline import data as data_lib
from pipeline import loop
from pipeline.config import load_config
from pipeline.methods import get_method
from pipeline.methods import replays as method_replays
from pipeline.models import architecture, build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("fast", "free", "pgd", "trades", "mart")


def run_recipe(recipe: str, args: argparse.Namespace, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
    config = load_config(ROOT / f"jobs/configs/fashion_mnist_{recipe}.toml", overrides=[f'data.path="{args.data}"'])
    info = data_lib.validate_dataset(args.data)
    x, y = data_lib.load_split(args.data, "train")
    torch.manual_seed(config.run.seed)
    model = build_model(
        architecture(config.model, shape=info.shape, num_classes=info.num_classes, mean=info.mean, std=info.std)
    )
    device = torch.device("cpu")
    optimizer = loop.make_optimizer(model, config.optim)
    steps_per_epoch = -(-len(y) // config.data.batch_size)
    replays = method_replays(config.method.name, config.method.replays)
    scheduler = loop.make_scheduler(
        optimizer, config.optim, total_epochs=config.run.epochs, steps_per_epoch=steps_per_epoch * replays
    )
    method = get_method(config.method.name, beta=config.method.beta)
    trace: list[dict] = []
    step_ms: list[float] = []
    train_s = 0.0
    steps = 0
    for epoch in range(1, config.run.epochs + 1):
        generator = torch.Generator().manual_seed(config.run.seed * 1_000_003 + epoch * 1009)
        indices = data_lib.shard_indices(len(y), rank=0, world_size=1, epoch=epoch, seed=config.run.seed)
        eps_for_step, attack = loop.epoch_schedule(config, epoch, steps_per_epoch=steps_per_epoch)
        batches = list(loop.tensor_batches(x, y, indices, config.data.batch_size))
        for offset in range(0, len(batches), args.eval_every):
            for i, batch in enumerate(batches[offset : offset + args.eval_every]):
                stats = loop.train_epoch(
                    model,
                    model,
                    [batch],
                    optimizer=optimizer,
                    scheduler=scheduler,
                    method=method,
                    attack=attack,
                    eps_for_step=lambda _s, step=offset + i, eps_at=eps_for_step: eps_at(step),
                    attack_mode=config.method.attack_mode,
                    device=device,
                    generator=generator,
                    replays=replays,
                )
                train_s += stats["seconds"]
                step_ms.append(1000 * stats["seconds"])
                steps += 1
            val = loop.clean_and_robust_correct(
                model,
                x_val,
                y_val,
                eps=config.attack.eps,
                norm=config.attack.norm,
                num_steps=20,
                step_size_factor=2.5,
                num_restarts=1,
                batch_size=500,
                device=device,
                generator=torch.Generator().manual_seed(0),
            )
            point = {
                "epoch": round(epoch - 1 + min(offset + args.eval_every, len(batches)) / len(batches), 3),
                "steps": steps,
                "train_s": round(train_s, 1),
                "clean": val["clean_correct"] / val["count"],
                "robust": val["robust_correct"] / val["count"],
            }
            trace.append(point)
            print(f"  {recipe}: {point}", flush=True)
            if point["robust"] >= args.target or train_s > 60 * args.budget_min:
                break
        if trace[-1]["robust"] >= args.target or train_s > 60 * args.budget_min:
            break
    reached = next((p for p in trace if p["robust"] >= args.target), None)
    median_ms = statistics.median(step_ms)
    return {
        "recipe": recipe,
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_val, y_val = data_lib.load_split(args.data, "val", max_examples=args.val_examples)
    started = time.perf_counter()
    results = [run_recipe(recipe, args, x_val, y_val) for recipe in args.recipes]
    results.sort(key=lambda r: (not r["reached"], r["priced_s"]))
    print(
        f"# time to {args.target:.0%} PGD-20 robust accuracy (first {args.val_examples} val examples, eps 0.1), "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}; "
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
