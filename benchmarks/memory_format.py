"""channels_last against contiguous (NCHW) conv weights, in one process and one run.

`build_model` returns models whose conv weights are channels_last (NHWC), so every conv runs in NHWC.
This measures what that buys on this machine, on the work that dominates our runs:

    small_cnn 28x28, PGD-3 training step (3 attack steps + one SGD step), batch 128
    small_cnn 28x28, one Square query (a forward pass without gradients), batch 750
    preact_resnet18 32x32, FGSM-RS training step (1 attack step + one SGD step), batch 32

Both formats hold the same weights. Measurements are interleaved round by round and the median over
rounds is kept, so drift on a noisy machine hits both alike. Prints a markdown table of ratios
(contiguous time / channels_last time; above 1 means channels_last is faster).

    .venv/bin/python benchmarks/memory_format.py [--rounds 5] [--threads 2] [--device cpu]

`--device cuda` measures the same on the GPU (cuDNN's NHWC kernels instead of oneDNN's); every timer waits
for the device's queue first.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from devices import add_device_option, describe, synchronize
from torch import nn

from pipeline.attacks import get_attack
from pipeline.config import ModelConfig
from pipeline.models import architecture, build_model


def _models(name: str, shape: tuple[int, int, int], device: torch.device) -> tuple[nn.Module, nn.Module]:
    c = shape[0]
    arch = architecture(ModelConfig(name=name), shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c)
    torch.manual_seed(0)
    fast = build_model(arch)
    slow = build_model(arch).to(memory_format=torch.contiguous_format)
    slow.load_state_dict(fast.state_dict())
    return slow.to(device), fast.to(device)  # .to(device) keeps each parameter's memory format


def _train_step(
    model: nn.Module, attack: str, num_steps: int, eps: float
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.train()
        x_adv = get_attack(attack)(
            model,
            x,
            y,
            eps=eps,
            step_size=2.5 * eps / num_steps,
            num_steps=num_steps,
            random_start=True,
            generator=generator,
        )
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_adv), y).backward()
        optimizer.step()

    return step


def _query(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def query(x: torch.Tensor, y: torch.Tensor) -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    cases = []
    for label, name, shape, batch, make in (
        (
            "small_cnn PGD-3 training step, batch 128",
            "small_cnn",
            (1, 28, 28),
            128,
            lambda m: _train_step(m, "pgd", 3, 0.1),
        ),
        ("small_cnn Square query (forward), batch 750", "small_cnn", (1, 28, 28), 750, _query),
        (
            "preact_resnet18 FGSM-RS training step, batch 32",
            "preact_resnet18",
            (3, 32, 32),
            32,
            lambda m: _train_step(m, "fgsm", 1, 8 / 255),
        ),
    ):
        slow, fast = _models(name, shape, device)
        x = torch.rand(batch, *shape, generator=torch.Generator(device=device).manual_seed(1), device=device)
        y = torch.randint(0, 10, (batch,), generator=torch.Generator(device=device).manual_seed(2), device=device)
        cases.append((label, make(slow), make(fast), x, y))

    times: dict[tuple[str, str], list[float]] = {}
    # Round 0 warms up (oneDNN primitive caches, cuDNN's algorithm choice) and is dropped.
    for round_index in range(args.rounds + 1):
        for label, slow, fast, x, y in cases:
            for fmt, fn in (("contiguous", slow), ("channels_last", fast)):
                synchronize(device)
                started = time.perf_counter()
                fn(x, y)
                synchronize(device)
                if round_index:
                    times.setdefault((label, fmt), []).append(time.perf_counter() - started)

    print(
        f"{platform.machine()}, device {describe(device)}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.rounds} rounds\n"
    )
    print("| work | contiguous (ms) | channels_last (ms) | ratio |")
    print("|---|---|---|---|")
    for label, *_ in cases:
        slow_ms = 1000 * statistics.median(times[(label, "contiguous")])
        fast_ms = 1000 * statistics.median(times[(label, "channels_last")])
        print(f"| {label} | {slow_ms:.1f} | {fast_ms:.1f} | **{slow_ms / fast_ms:.2f}** |")


if __name__ == "__main__":
    main()
