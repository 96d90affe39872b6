"""Step efficiency against its floor, and against IBM ART's PGD, in one process and one run.

A method's training step on small_cnn / Fashion-MNIST batches, timed through the real training loop
(`pipeline.training.steps.train_epoch`: the method, the attack, eps schedule, optimizer and LR scheduler step),
divided by its floor, built from primitives timed in the same run on the same batches:

    A  forward + backward to the input only (one attack step's unavoidable work)
    T  one clean training step (forward, backward to the weights, optimizer step)
    F  one forward without gradients;  T2  a clean training step on a batch twice as large

    pgd_at PGD-K:  K*A + T         fgsm_rs:  A + T          free_at (per replay):  T
    trades PGD-K:  F + K*A + T2    (clean prediction, K attack steps, one step on clean + adversarial)
    pgd_at PGD-K + AWP:  K*A + 2T  (adversarial weight perturbation: one more forward + backward to the
                                    weights on the same examples; its ratio to pgd_at PGD-K is AWP's cost)

The ART row is the same PGD-10 step built from ART 1.20's ProjectedGradientDescentPyTorch (generate on
the batch, then our clean training step on its output), divided by the same floor.

Measurements are interleaved round by round (every row once per round) and the median over rounds is
kept, so drift on a noisy machine hits all rows alike. Prints a markdown table; --json writes it too.

    .venv/bin/python benchmarks/step_efficiency.py [--data data/fashion-mnist] [--steps 4] [--rounds 5] [--device cpu]

`--device cuda` times every row on the GPU: the batches are put there once (as the trainer places a split
that fits), every timer waits for the device's queue, and ART's classifier is given the same GPU (its PGD
still moves each batch through numpy: its design, and part of its time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from devices import add_device_option, describe, synchronize

from pipeline import data as data_lib
from pipeline.config import AttackConfig, ModelConfig, OptimConfig
from pipeline.methods import get_method
from pipeline.models import architecture, build_model
from pipeline.training import steps
from pipeline.training.plan import EpochPlan

ROOT = Path(__file__).resolve().parents[1]


def _batches(data: Path, batch_size: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data_lib.load_split(str(data), "train", max_examples=batch_size * count)
    x, y = x.to(device), y.to(device)  # once, outside every timer: the rows time steps, not copies
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, batch_size * count, batch_size)]


def _fresh(
    arch: dict, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = build_model(arch).to(device)  # before the optimizer: it is built for the parameters' device
    config = OptimConfig(name="sgd", lr=0.01, lr_schedule="constant")
    optimizer = steps.make_optimizer(model, config)
    return model, optimizer, steps.make_scheduler(optimizer, config, total_epochs=1, steps_per_epoch=1)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="training steps timed per row per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--no-art", action="store_true", help="skip the IBM ART row")
    parser.add_argument("--json", default="", help="also write the rows here")
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    info = data_lib.validate_dataset(args.data)
    arch = architecture(
        ModelConfig(name="small_cnn"), shape=info.shape, num_classes=info.num_classes, mean=info.mean, std=info.std
    )
    batches = _batches(Path(args.data), args.batch_size, args.steps, device)
    eps = args.eps

    def method_step(name: str, attack: AttackConfig, replays: int = 1, awp_gamma: float = 0.0) -> Callable[[], None]:
        model, optimizer, scheduler = _fresh(arch, device)
        plan = EpochPlan(
            name,
            get_method(name),
            attack,
            eps_for_step=lambda _step: eps,
            attack_mode="eval",
            replays=replays,
            awp_gamma=awp_gamma,
        )
        generator = torch.Generator(device=device).manual_seed(0)

        def run() -> None:
            steps.train_epoch(
                model,
                model,
                batches,
                plan,
                optimizer=optimizer,
                scheduler=scheduler,
                device=device,
                generator=generator,
            )

        return run

    def clean_step(scale: int = 1) -> Callable[[], None]:
        model, optimizer, _ = _fresh(arch, device)

        def run() -> None:
            for x, y in batches:
                x, y = (torch.cat([x] * scale), torch.cat([y] * scale)) if scale > 1 else (x, y)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run

    def input_gradient() -> Callable[[], None]:
        model, _, _ = _fresh(arch, device)
        model.eval()

        def run() -> None:
            for x, y in batches:
                x = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)

        return run

    def forward_only() -> Callable[[], None]:
        model, _, _ = _fresh(arch, device)

        def run() -> None:
            with torch.no_grad():
                for x, _ in batches:
                    model(x)

        return run

    def art_pgd10() -> Callable[[], None]:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier

        model, optimizer, _ = _fresh(arch, device)
        classifier = PyTorchClassifier(
            model=model,
            loss=torch.nn.CrossEntropyLoss(),
            input_shape=tuple(info.shape),
            nb_classes=info.num_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if device.type == "cuda" else "cpu",  # ART's "gpu": the current CUDA device
        )
        attack = ProjectedGradientDescentPyTorch(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=2.5 * eps / 10,
            max_iter=10,
            num_random_init=1,
            batch_size=args.batch_size,
            verbose=False,
        )

        def run() -> None:
            for x, y in batches:
                model.eval()
                x_adv = torch.from_numpy(attack.generate(x.cpu().numpy(), y=y.cpu().numpy())).to(device)
                model.train()
                loss = F.cross_entropy(model(x_adv), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run

    def pgd(k: int) -> AttackConfig:
        return AttackConfig(name="pgd", eps=eps, num_steps=k, step_size_factor=2.5)

    fgsm = AttackConfig(name="fgsm", eps=eps, num_steps=1, step_size_factor=1.25)
    rows: dict[str, Callable[[], None]] = {
        "A": input_gradient(),
        "T": clean_step(),
        "T2": clean_step(2),
        "F": forward_only(),
        "pgd_at PGD-1": method_step("pgd_at", pgd(1)),
        "pgd_at PGD-3": method_step("pgd_at", pgd(3)),
        "pgd_at PGD-10": method_step("pgd_at", pgd(10)),
        "pgd_at PGD-3 + AWP": method_step("pgd_at", pgd(3), awp_gamma=0.01),
        "fgsm_rs": method_step("fgsm_rs", fgsm),
        "free_at (1 replay)": method_step("free_at", AttackConfig(name="fgsm", eps=eps, num_steps=1)),
        "trades PGD-10": method_step("trades", pgd(10)),
    }
    if not args.no_art:
        rows["ART PGD-10 + step"] = art_pgd10()
    for fn in rows.values():  # warm-up: allocator, thread pool, lazy init
        fn()
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            samples[name].append(_timed(fn, device) / len(batches))
    ms = {name: 1000 * statistics.median(values) for name, values in samples.items()}

    a, t, t2, f = ms["A"], ms["T"], ms["T2"], ms["F"]
    floors = {
        "pgd_at PGD-1": a + t,
        "pgd_at PGD-3": 3 * a + t,
        "pgd_at PGD-10": 10 * a + t,
        # AWP's extra pass: forward + backward to the weights on the same examples, a clean step's work.
        "pgd_at PGD-3 + AWP": 3 * a + 2 * t,
        "fgsm_rs": a + t,
        "free_at (1 replay)": t,
        "trades PGD-10": f + 10 * a + t2,
        "ART PGD-10 + step": 10 * a + t,
    }
    table = [
        {"step": name, "ms": round(ms[name], 2), "floor_ms": round(floor, 2), "ratio": round(ms[name] / floor, 3)}
        for name, floor in floors.items()
        if name in ms
    ]
    print(
        f"# step efficiency: small_cnn, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
        f"{platform.machine()}, device {describe(device)}; medians of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"primitives (ms per batch): A fwd+bwd-to-input {a:.2f}  T clean step {t:.2f}  T2 {t2:.2f}  F {f:.2f}")
    print("| step | ms | floor ms | ratio to floor |\n|---|---:|---:|---:|")
    for row in table:
        print(f"| {row['step']} | {row['ms']:.1f} | {row['floor_ms']:.1f} | **{row['ratio']:.3f}** |")
    if args.json:
        primitives = {"A": a, "T": t, "T2": t2, "F": f}
        Path(args.json).write_text(
            json.dumps({"device": describe(device), "primitives_ms": primitives, "rows": table}, indent=1)
        )


if __name__ == "__main__":
    main()
