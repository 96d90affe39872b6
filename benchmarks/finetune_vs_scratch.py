"""Adversarial fine-tuning vs training from scratch on Fashion-MNIST (Linf eps 0.1, small_cnn).

Three runs in this process, one worker's work each (`Trainer` via fit_in_process, no Ray):
1. pretraining: jobs/configs/fashion_mnist_standard.toml (standard training), saved as safetensors;
2. from scratch: jobs/configs/fashion_mnist_pgd.toml (PGD-AT, PGD-5, 3 epochs) to its end; its final
   validation PGD-20 robust accuracy is the target;
3. fine-tuning: jobs/configs/fashion_mnist_finetune.toml with model.init = the pretrained weights,
   evaluated every --eval-every steps (not timed) and stopped when it reaches the target.
Printed: the fine-tuning's training time to the target as a fraction of the from-scratch recipe's training
time (goal <= 0.5), priced at each run's median step time too (a burst of other load inflates a few steps,
not the median). Pretraining time is printed beside it but not counted: the goal starts from a given
standard-trained model.

    .venv/bin/python benchmarks/finetune_vs_scratch.py [--data data/fashion-mnist] [--json F] [--device cpu]

`--device cuda` trains and evaluates on the GPU; step times are then the synchronised ones `train_epoch`
reports to `on_step` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from devices import add_device_option, describe

from pipeline import data as data_lib
from pipeline.config import load_config
from pipeline.model_folder import WEIGHTS_FILE, save_weights
from pipeline.training import fit_in_process
from pipeline.training.validation import pgd20_correct

ROOT = Path(__file__).resolve().parents[1]


def timed_run(recipe: str, args, overrides: list[str], *, x_val, y_val, target: float | None = None) -> dict:
    """Train a recipe; with a target, evaluate every --eval-every steps and stop once it is reached."""
    config = load_config(ROOT / f"jobs/configs/{recipe}.toml", [f'data.path="{args.data}"', *overrides])
    step_ms: list[float] = []
    trace: list[dict] = []

    def after_step(epoch: int, step: int, seconds: float, model: torch.nn.Module) -> bool:
        step_ms.append(1000 * seconds)
        if target is None or len(step_ms) % args.eval_every:
            return False
        val = pgd20_correct(model, x_val, y_val, eps=0.1, norm="linf", device=args.device)
        point = {
            "steps": len(step_ms),
            "train_s": round(sum(step_ms) / 1000, 1),
            "clean": val["clean_correct"] / val["count"],
            "robust": val["robust_correct"] / val["count"],
        }
        trace.append(point)
        print(f"  {recipe}: {point}", flush=True)
        return point["robust"] >= target

    model, arch, _ = fit_in_process(config, device=args.device, on_step=after_step)
    # fit_in_process ships the model on the CPU; evaluate it where it trained (save_weights copies to host).
    final = pgd20_correct(model.to(args.device), x_val, y_val, eps=0.1, norm="linf", device=args.device)
    reached = next((p for p in trace if p["robust"] >= target), None) if target is not None else None
    steps = reached["steps"] if reached else len(step_ms)
    return {
        "recipe": recipe,
        "model": model,
        "arch": arch,
        "steps": steps,
        "train_s": round(sum(step_ms[:steps]) / 1000, 1),
        "priced_s": round(steps * statistics.median(step_ms) / 1000, 1),
        "final_clean": final["clean_correct"] / final["count"],
        "final_robust": final["robust_correct"] / final["count"],
        "reached": reached,
        "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    parser.add_argument("--eval-every", type=int, default=36, help="fine-tuning steps between evaluations")
    parser.add_argument("--val-examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="")
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_lib.validate_dataset(args.data)
    x_val, y_val = data_lib.load_split(args.data, "val", max_examples=args.val_examples)
    started = time.perf_counter()
    pretrain = timed_run("fashion_mnist_standard", args, [], x_val=x_val, y_val=y_val)
    scratch = timed_run("fashion_mnist_pgd", args, [], x_val=x_val, y_val=y_val)
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(pretrain["model"], pretrain["arch"], Path(tmp))
        init = f'model.init="{Path(tmp) / WEIGHTS_FILE}"'
        finetune = timed_run(
            "fashion_mnist_finetune", args, [init], x_val=x_val, y_val=y_val, target=scratch["final_robust"]
        )
    ratio, priced = finetune["train_s"] / scratch["train_s"], finetune["priced_s"] / scratch["priced_s"]
    print(
        f"# fine-tuning vs from scratch, Fashion-MNIST Linf eps 0.1, PGD-20 on the first {args.val_examples} val "
        f"examples; {args.threads} threads, torch {torch.__version__}, {platform.machine()}, "
        f"device {describe(args.device)}; "
        f"whole run {time.perf_counter() - started:.0f} s"
    )
    print("| run | steps | train min | priced min | final clean | final PGD-20 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in (pretrain, scratch, finetune):
        print(
            f"| {r['recipe']} | {r['steps']} | {r['train_s'] / 60:.1f} | {r['priced_s'] / 60:.1f} "
            f"| {r['final_clean']:.4f} | {r['final_robust']:.4f} |"
        )
    status = "reached" if finetune["reached"] else "NOT reached (time of its whole schedule)"
    print(
        f"fine-tuning to {scratch['final_robust']:.4f}: {status}; time / from-scratch time = {ratio:.3f} "
        f"(priced {priced:.3f}); goal <= 0.5"
    )
    if args.json:
        keep = ("recipe", "steps", "train_s", "priced_s", "final_clean", "final_robust", "reached", "trace")
        rows = [{k: r[k] for k in keep} for r in (pretrain, scratch, finetune)]
        Path(args.json).write_text(
            json.dumps(
                {"device": describe(args.device), "runs": rows, "ratio": ratio, "priced_ratio": priced}, indent=1
            )
        )


if __name__ == "__main__":
    main()
