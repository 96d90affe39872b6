"""A model of data-parallel scaling for adversarial vs standard training (RESULTS.md, "Scaling").

Per training step and worker, data-parallel SGD all-reduces the full gradient once (4 bytes per fp32
parameter) whatever the method, while the compute grows with the attack: PGD-K adds K forward +
backward-to-input passes to the clean step. So the communication / compute ratio of PGD-K AT is the
standard ratio divided by roughly (1 + K * A/T), and adversarial training should scale better.

Counted here, not assumed: parameters and FLOPs of our models (torch's FlopCounterMode on one
example: forward F, forward + backward to the input A, forward + backward to the weights T).
The default 40 TFLOP/s is an A100 in bf16 at ~13% of peak, what small-image convnets
sustain in practice (Wong et al.'s FGSM epochs on CIFAR-10 imply ~6 TFLOP/s on an RTX 2080 Ti).
ImageNet ResNet-50 is added from its published constants (25.56 M parameters, 4.09 GMACs forward) with
A = 2F and T = 3F. Assumed (flags): sustained accelerator throughput and all-reduce bus bandwidth within
a node (8 GPUs on NVLink) and across nodes (64 GPUs = 8 nodes on InfiniBand), ring all-reduce time
2 (N-1)/N * bytes / bandwidth, and no overlap of communication with the backward pass (DDP's bucketed
overlap only makes real efficiency higher than printed).

    .venv/bin/python benchmarks/scaling_model.py [--tflops 40] [--nvlink-gbs 100] [--ib-gbs 10]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig
from pipeline.models import architecture, build_model


def _flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def counted(name: str, model_config: ModelConfig, shape: tuple[int, int, int], num_classes: int) -> dict:
    """Parameters and per-example FLOPs (F, A, T) of one of our models."""
    arch = architecture(
        model_config, shape=shape, num_classes=num_classes, mean=(0.5,) * shape[0], std=(0.25,) * shape[0]
    )
    model = build_model(arch).eval()  # eval: BatchNorm in inference form; FLOPs are the same
    x, y = torch.rand(1, *shape), torch.zeros(1, dtype=torch.long)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def to_input() -> None:
        delta = torch.zeros_like(x, requires_grad=True)
        torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)

    def to_weights() -> None:
        F.cross_entropy(model(x), y).backward()

    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "F": _flops(forward), "A": _flops(to_input), "T": _flops(to_weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=40.0, help="sustained TFLOP/s per GPU")
    parser.add_argument("--nvlink-gbs", type=float, default=100.0, help="all-reduce bus GB/s within a node")
    parser.add_argument("--ib-gbs", type=float, default=10.0, help="all-reduce bus GB/s across nodes")
    args = parser.parse_args()

    models = [
        {**counted("small_cnn, Fashion-MNIST", ModelConfig(name="small_cnn"), (1, 28, 28), 10), "batch": 128},
        {**counted("PreActResNet-18, CIFAR-10", ModelConfig(name="preact_resnet18"), (3, 32, 32), 10), "batch": 128},
        {
            **counted("WRN-34-10, CIFAR-10", ModelConfig(name="wide_resnet", depth=34, width=10), (3, 32, 32), 10),
            "batch": 128,
        },
        {"model": "ResNet-50, ImageNet (published)", "params": 25_557_032, "F": 8.18e9, "batch": 256},
    ]
    for m in models:
        m.setdefault("A", 2 * m["F"])
        m.setdefault("T", 3 * m["F"])
    methods = {"standard": 0, "FGSM-RS / PGD-1": 1, "PGD-3": 3, "PGD-10": 10}
    print(
        f"# assumptions: {args.tflops:g} TFLOP/s per GPU, all-reduce {args.nvlink_gbs:g} GB/s in a node (8 GPUs), "
        f"{args.ib_gbs:g} GB/s across nodes (64 GPUs); no compute/communication overlap"
    )
    print(
        "| model | params | grad MB | A/T | method | compute ms/step "
        "| 8 GPUs: comm ms, efficiency | 64 GPUs: comm ms, efficiency |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for m in models:
        grad_bytes = 4 * m["params"]
        for method, k in methods.items():
            flops = m["batch"] * (k * m["A"] + m["T"])
            compute_ms = 1000 * flops / (args.tflops * 1e12)
            cells = []
            for n, bandwidth in ((8, args.nvlink_gbs), (64, args.ib_gbs)):
                comm_ms = 1000 * 2 * (n - 1) / n * grad_bytes / (bandwidth * 1e9)
                cells.append(f"{comm_ms:.2f}, {compute_ms / (compute_ms + comm_ms):.1%}")
            print(
                f"| {m['model']} | {m['params'] / 1e6:.2f} M | {grad_bytes / 2**20:.1f} | {m['A'] / m['T']:.2f} "
                f"| {method} | {compute_ms:.2f} | {cells[0]} | {cells[1]} |"
            )


if __name__ == "__main__":
    main()
