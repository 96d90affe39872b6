"""bf16 autocast against fp32 training steps on this machine, in one process and one run, and what
`run.mixed_precision = "auto"` picks here.

bf16 pays only where the hardware does bf16 arithmetic (AVX-512-BF16 or AMX on x86, CUDA from Ampere).
Elsewhere torch emulates it, and "auto" must fall back to fp32. This measures both precisions on the
steps of the two Fashion-MNIST recipes that set "auto":

    fashion_mnist_fast_short: FGSM-RS (1 attack step + one SGD step), small_cnn width 1, batch 128
    fashion_mnist_mart_wide:  MART, PGD-3 (3 attack steps + one SGD step), small_cnn width 2, batch 64

Each step is `pipeline.training.steps.train_epoch` on one minibatch, as a Ray worker runs it. Both precisions
start from the same weights and alternate round by round, so drift on a noisy machine hits both alike.
The median over rounds is kept, and round 0 (warm-up) is dropped. Prints a markdown table of ratios
(bf16 time / fp32 time: above 1 means bf16 is slower), then whether "auto"'s choice was the faster one.

    .venv/bin/python benchmarks/mixed_precision.py [--rounds 4] [--threads 2] [--device cpu]

`--device cuda` measures the same steps on the GPU (autocast on "cuda", and "auto"'s pick for that GPU).
`train_epoch`'s seconds include reading its sums back, so they wait for the GPU's queue.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from devices import add_device_option, describe

from pipeline.config import AttackConfig, Config, ModelConfig
from pipeline.methods import get_method
from pipeline.models import architecture, build_model
from pipeline.training.plan import EpochPlan
from pipeline.training.steps import bf16_is_native, make_optimizer, train_epoch, training_precision

CASES = (
    # label, method, attack, width, batch
    ("FGSM-RS step, small_cnn width 1, batch 128", "fgsm_rs", AttackConfig(name="fgsm", num_steps=1), 1, 128),
    ("MART PGD-3 step, small_cnn width 2, batch 64", "mart", AttackConfig(name="pgd", num_steps=3), 2, 64),
)


def _step(method_name: str, attack: AttackConfig, width: int, batch: int, precision: str, device: torch.device):
    arch = architecture(
        ModelConfig(name="small_cnn", width=width), shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,)
    )
    torch.manual_seed(0)  # the same initial weights for both precisions
    model = build_model(arch).to(device)  # before the optimizer: it is built for the parameters' device
    optimizer = make_optimizer(model, Config().optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = EpochPlan(method_name, get_method(method_name), attack, eps_for_step=lambda step: 0.1, attack_mode="eval")
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator(device=device).manual_seed(1), device=device)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator(device=device).manual_seed(2), device=device)

    def step() -> float:
        return train_epoch(
            model,
            model,
            [(x, y)],
            plan,
            optimizer=optimizer,
            scheduler=scheduler,
            device=device,
            generator=torch.Generator(device=device).manual_seed(3),
            precision=precision,
        )["seconds"]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    steps = {
        (label, precision): _step(method, attack, width, batch, precision, device)
        for label, method, attack, width, batch in CASES
        for precision in ("none", "bf16")
    }
    times: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds + 1):
        for key, step in steps.items():
            seconds = step()
            if round_index:
                times.setdefault(key, []).append(seconds)

    native = bf16_is_native(device)
    auto = training_precision("auto", bf16_native=native)
    print(
        f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), device {describe(device)}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds; "
        f"bf16 hardware: {native}; auto picks: {auto}\n"
    )
    print("| training step | fp32 (ms) | bf16 (ms) | bf16 / fp32 | faster | auto's pick |")
    print("|---|---:|---:|---:|---|---|")
    right = True
    for label, *_ in CASES:
        fp32 = statistics.median(times[(label, "none")])
        bf16 = statistics.median(times[(label, "bf16")])
        faster = "bf16" if bf16 < fp32 else "none"
        right &= faster == auto
        print(f"| {label} | {fp32 * 1e3:.0f} | {bf16 * 1e3:.0f} | {bf16 / fp32:.2f} | {faster} | {auto} |")
    print(f"\nauto picked the faster precision for every step: {right}")


if __name__ == "__main__":
    main()
