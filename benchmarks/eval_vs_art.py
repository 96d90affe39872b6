"""Our `standard` evaluation vs IBM ART's AutoAttack: same model, same examples, same process, one run.

    .venv/bin/python benchmarks/eval_vs_art.py [--num-examples 100] [--threads 1] [--device cpu]

Trains a PGD-AT small_cnn on digits in-process (Linf eps=0.2, ~30 s) unless --model names one, then
times (1) advtrain's `standard` protocol (APGD-CE, APGD-T x9, Square 5000) and (2) ART 1.20's AutoAttack
with its default attack list (APGD-CE and APGD-DLR with 5 random inits, DeepFool, Square 5000), and
prints robust accuracies and the time ratio. Results go to benchmarks/results/eval_vs_art.json.

`--device cuda` trains and evaluates on the GPU and gives ART's PyTorchClassifier the same GPU, so both sides
run on one device (ART still moves every batch through numpy: that is its design, and part of its time).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from devices import add_device_option, describe, elapsed, synchronize
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model URI or folder (default: train one)")
    parser.add_argument("--data", help="prepared digits folder (default: prepare one in a temp dir)")
    parser.add_argument("--num-examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    add_device_option(parser)
    args = parser.parse_args()
    device = args.device
    torch.set_num_threads(args.threads)

    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    from pipeline.config import config_from_dict
    from pipeline.data import load_split, prepare_digits
    from pipeline.evaluate import evaluate_examples, evaluation_numerics
    from pipeline.tracking.model_store import load_model
    from pipeline.training import fit_in_process

    data = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / "digits"
    if not (data / "metadata.json").exists():
        prepare_digits(data)
    if args.model:
        model = load_model(args.model)
    else:
        config = config_from_dict(
            {
                "run": {"epochs": 25, "keep_best": False},
                "data": {"path": str(data), "batch_size": 64},
                "attack": {"eps": 0.2, "num_steps": 7},
                "schedule": {"eps_ramp": "linear", "eps_ramp_epochs": 5},
                "optim": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
            }
        )
        model = fit_in_process(config, device=device)[0]
    if device.type == "cuda":
        evaluation_numerics()  # fp32 without TF32, as `advtrain evaluate` runs on a GPU (both sides here)
    model.eval().to(device)  # evaluate_examples follows the model's device
    x, y = load_split(data, "test", max_examples=args.num_examples)  # host tensors: ART takes numpy

    synchronize(device)
    started = time.perf_counter()
    ours = evaluate_examples(model, x, y, norm="linf", eps=0.2, protocol="standard", seed=0, chunk_size=len(y))
    ours_s = elapsed(started, device)
    ours_acc = float(ours.robust_after["square"].float().mean())

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",  # ART's "gpu" is the current CUDA device
    )
    started = time.perf_counter()
    x_adv = AutoAttack(classifier, norm=np.inf, eps=0.2, eps_step=0.05, batch_size=len(y)).generate(
        x.numpy(), y.numpy()
    )
    art_s = elapsed(started, device)
    with torch.no_grad():
        art_acc = float((model(torch.as_tensor(x_adv).to(device)).argmax(1).cpu() == y).float().mean())

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "device": describe(device),
        "num_examples": len(y),
        "ours_standard": {"seconds": ours_s, "robust_acc": ours_acc},
        "art_autoattack_default": {"seconds": art_s, "robust_acc": art_acc},
        "time_ratio_ours_over_art": ours_s / art_s,
        "robust_acc_difference_points": 100 * (ours_acc - art_acc),
    }
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "eval_vs_art.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"examples {len(y)}  threads {torch.get_num_threads()}  device {describe(device)}")
    print(f"advtrain standard : {ours_s:8.1f} s  robust acc {ours_acc:.4f}")
    print(f"ART AutoAttack    : {art_s:8.1f} s  robust acc {art_acc:.4f}")
    print(
        f"time ratio ours/ART = {ours_s / art_s:.3f}   robust acc ours - ART = {100 * (ours_acc - art_acc):+.1f} points"
    )


if __name__ == "__main__":
    main()
