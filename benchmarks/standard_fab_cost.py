"""What FAB-T costs inside `standard`: the cascade with and without it on the same model and examples, in
one process (one thread), and the robust accuracy after each stage of both.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/standard_fab_cost.py --model-folder MODEL_DIR \
        --data data/fashion-mnist --num-examples 100 --eps 0.1 --json benchmarks/results/standard_fab_cost.json

MODEL_DIR: a model folder (`save_weights` output, e.g. `benchmarks/autoattack_gap.py train --out ...`).
`--device cuda` runs both cascades on the GPU (fp32 without TF32, as `advtrain evaluate` runs there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from devices import add_device_option, describe, elapsed, synchronize


def _cascade(model, x, y, *, protocol: str, eps: float) -> dict:
    from pipeline.evaluate import evaluate_examples, model_device

    device = model_device(model, x.device)  # evaluate_examples follows the model's device
    synchronize(device)
    started = time.perf_counter()
    result = evaluate_examples(model, x, y, norm="linf", eps=eps, protocol=protocol, seed=0, chunk_size=len(y))
    return {
        "seconds": elapsed(started, device),
        "seconds_per_attack": result.seconds,
        "accuracy_after": {k: float(v.float().mean()) for k, v in result.robust_after.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-folder", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--num-examples", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--json")
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pipeline import evaluate
    from pipeline.data import load_split
    from pipeline.model_folder import load_folder

    if args.device.type == "cuda":
        evaluate.evaluation_numerics()
    model = load_folder(args.model_folder)[0].eval().to(args.device)
    x, y = load_split(args.data, "test", max_examples=args.num_examples)
    # The cascade as it was before FAB-T joined it, next to today's, on the same examples.
    evaluate.PROTOCOLS["standard_without_fab"] = [a for a in evaluate.STANDARD if a[0] != "fab_t"]
    rows = {name: _cascade(model, x, y, protocol=name, eps=args.eps) for name in ("standard_without_fab", "standard")}
    ratio = rows["standard"]["seconds"] / rows["standard_without_fab"]["seconds"]
    for name, row in rows.items():
        stages = ", ".join(f"{k} {v:.3f}" for k, v in row["accuracy_after"].items())
        print(f"{name:22s} {row['seconds']:7.1f} s   {stages}")
    print(f"standard with FAB-T / without: {ratio:.2f}x the time")
    if args.json:
        out = {
            "model": args.model_folder,
            "device": describe(args.device),
            "num_examples": len(y),
            "eps": args.eps,
            "rows": rows,
            "time_ratio": ratio,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
