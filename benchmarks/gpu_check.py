"""`make gpu-check`: the GPU path end to end on one CUDA device, in one script under 8 minutes (issue 31).

Seven parts, in order; each returns its numbers and checks, each check "pass", "fail" or "not run: ...":

1. environment: torch, CUDA, cuDNN and NCCL versions, the device, its compute capability and memory,
   whether bf16 is native, the TF32 flags.
2. training: every method x precision {none, bf16} x AWP {off, 0.005} for a few minibatches of digits with
   `train_epoch` on the device: the loss is finite, the weights moved and stayed fp32, and every parameter,
   gradient, buffer and optimizer state tensor is still on the device.
3. attacks: every registered attack on the device and on the CPU, with the same weights and test examples:
   x_adv on the device, in the eps-ball and [0,1], the model's mode unchanged, and robust accuracy within
   max(0.05, 3 examples) of the CPU's (random starts draw from another RNG stream on another device).
4. ddp: 2 ranks on one device (gloo: NCCL refuses two ranks on one GPU; gloo takes CUDA tensors) train
   PGD-AT with AWP on their own shards; their weights must end bit-identical.
5. ray: `advtrain train` (1 epoch, 1 Ray Train worker with a GPU) then `advtrain evaluate --protocol fast`
   of the registered version; both exit 0 and the report says it ran on CUDA.
6. throughput: FGSM-RS training images/s of PreActResNet-18 on 3x32x32 (fp32 and bf16), and the
   examples/s of `evaluate_chunk` with the fast protocol.
7. pytest: `pytest -m gpu tests/gpu`.

It prints one line per check, writes benchmarks/results/gpu/gpu_check.json (every number, every verdict)
and gpu_check.md (a table), and exits 1 when any check failed. A part that raises is recorded as failed
(its traceback on stderr) and the next part still runs: one bug should not hide the rest of the picture
on a GPU node whose time is short.

`--cpu` runs every part that needs no CUDA on the CPU, as a smoke test that keeps this script from
rotting (tests/unit/test_gpu_check.py runs parts 2-4 at the tiniest sizes), and writes to
benchmarks/results/gpu/cpu/ so that a CPU run never overwrites GPU figures. Without --cpu and without
CUDA it stops at once (exit 2). docs/gpu.md says how to run it.

    .venv/bin/python benchmarks/gpu_check.py [--cpu] [--skip-ray] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline import data
from pipeline.attacks import ATTACKS
from pipeline.attacks.minimal import perturbation_norms
from pipeline.config import Config, ModelConfig, load_config
from pipeline.evaluate import evaluate_chunk
from pipeline.methods import METHODS
from pipeline.models import architecture, build_model
from pipeline.training import LocalWorld
from pipeline.training.plan import plan_epoch
from pipeline.training.steps import bf16_is_native, make_optimizer, make_scheduler, tensor_batches, train_epoch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
DEMO_CONFIG = ROOT / "jobs" / "configs" / "digits_demo.toml"
DIGITS = ROOT / "data" / "digits"
NO_CUDA = "not run: no CUDA"
AWP_GAMMA = 0.005
# Part 3's radii: small enough that the reference model keeps some robust accuracy, so that the CPU and
# device runs have something to disagree about.
ATTACK_EPS = {"linf": 0.1, "l2": 1.0}
MINIMAL = ("deepfool", "fab_t", "cw_l2", "fmn")  # run with eps=inf, as `--protocol minimal` does
# name -> (norm, options): small budgets (the papers' are 10-100x larger) keep part 3 near a minute.
ATTACK_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "fgsm": ("linf", {"random_start": True, "step_size": 1.25 * ATTACK_EPS["linf"]}),
    "pgd": ("linf", {"num_steps": 20, "step_size": 2.5 * ATTACK_EPS["linf"] / 20}),
    "pgd_cw": ("linf", {"num_steps": 20, "step_size": 2.5 * ATTACK_EPS["linf"] / 20}),
    "apgd_ce": ("linf", {"num_steps": 20}),
    "apgd_dlr": ("linf", {"num_steps": 20}),
    "apgd_t": ("linf", {"num_steps": 20, "num_target_classes": 3}),
    "square": ("linf", {"num_queries": 200}),
    "mi_fgsm": ("linf", {"num_steps": 10}),
    "deepfool": ("linf", {"num_steps": 20}),
    "fab_t": ("linf", {"num_steps": 20, "num_target_classes": 3}),
    "cw_l2": ("l2", {"num_steps": 100, "binary_search_steps": 3, "initial_const": 1.0}),
    "fmn": ("linf", {"num_steps": 50}),
}


@dataclass(frozen=True)
class Sizes:
    """How much each part runs: GPU (the check itself), CPU (--cpu, a smoke test), TINY (the unit test)."""

    train_batches: int = 3  # part 2: minibatches per method x precision x AWP
    train_batch_size: int = 64
    reference_epochs: int = 5  # part 3: clean training of the attacked small_cnn (CPU, seeded)
    attack_examples: int = 256
    ddp_steps: int = 20  # part 4: steps per rank
    ddp_batch_size: int = 24
    throughput_batch: int = 512  # part 6
    throughput_warmup: int = 3
    throughput_steps: int = 20
    eval_examples: int = 256


GPU = Sizes()
# PreActResNet-18 on one CPU thread: ~1 s per FGSM-RS step of 16 images, ~2 s per fast-protocol example.
CPU = Sizes(attack_examples=128, throughput_batch=16, throughput_warmup=1, throughput_steps=2, eval_examples=4)
TINY = Sizes(
    train_batches=1, train_batch_size=16, reference_epochs=1, attack_examples=16, ddp_steps=2, ddp_batch_size=8
)


# ------------------------------------------------------------------ checks and their lines
def check(part: str, name: str, ok: bool | None, detail: str = "", **numbers: Any) -> dict[str, Any]:
    """One check's record (ok None: not run, `detail` says why), printed as one line."""
    status = "pass" if ok else "fail" if ok is not None else detail
    print(f"{'PASS' if ok else 'FAIL' if ok is not None else 'SKIP':<5} {part:<11} {name:<28} {detail}", flush=True)
    return {"check": name, "status": status, "detail": detail, **numbers}


def part_status(checks: list[dict[str, Any]]) -> str:
    """fail if any check failed, pass if any passed, else the first check's reason for not running."""
    statuses = [c["status"] for c in checks]
    if "fail" in statuses:
        return "fail"
    return "pass" if "pass" in statuses else statuses[0] if statuses else "not run"


def failures(*conditions: tuple[bool, str]) -> list[str]:
    """The messages of the conditions that do not hold."""
    return [message for holds, message in conditions if not holds]


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall time measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensors_off_device(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> list[str]:
    """Names of the parameters, gradients, buffers and optimizer state tensors not on `device`."""
    named = [(f"param {n}", p) for n, p in model.named_parameters()]
    named += [(f"grad {n}", p.grad) for n, p in model.named_parameters() if p.grad is not None]
    named += [(f"buffer {n}", b) for n, b in model.named_buffers()]
    for i, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            # Adam's step counter is a 0-dim CPU tensor by design unless the optimizer is fused/capturable.
            if isinstance(value, torch.Tensor) and not (key == "step" and value.dim() == 0):
                named.append((f"optimizer {i}.{key}", value))
    return [name for name, t in named if t.device != device]


# ------------------------------------------------------------------ 1. environment
def memory_gib(device: torch.device) -> float:
    """The GPU's memory, or the machine's for the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)


def environment(device: torch.device) -> dict[str, Any]:
    """What the check ran on; CUDA-only entries say "not run: no CUDA" on the CPU."""
    cuda = device.type == "cuda"
    nccl = torch.cuda.nccl.version() if cuda else None
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or NO_CUDA,
        "cudnn": torch.backends.cudnn.version() if cuda else NO_CUDA,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else NO_CUDA,
        "bf16_native": bf16_is_native(device),
        "nccl": (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)) if cuda else NO_CUDA,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "gpu_count": torch.cuda.device_count(),
        "memory_gib": memory_gib(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    where = (
        f"CUDA {info['cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}, {info['device']} "
        f"(sm {info['capability']}, {info['memory_gib']} GiB, {info['gpu_count']} GPUs)"
        if cuda
        else f"no CUDA, CPU {info['device']} ({info['cpu_capability']}, {info['memory_gib']} GiB)"
    )
    detail = (
        f"torch {info['torch']}, {where}, bf16 native {info['bf16_native']}, "
        f"TF32 matmul/cudnn {info['tf32_matmul']}/{info['tf32_cudnn']}"
    )
    ok = not cuda or (torch.version.cuda is not None and info["gpu_count"] >= 1)
    return {**info, "checks": [check("environment", "versions and device", ok, detail)]}


# ------------------------------------------------------------------ 2. every method on the device
def training_config(
    method: str, *, awp: bool = False, precision: str = "none", overrides: dict[str, Any] | None = None
) -> Config:
    """digits_demo.toml with `method`, the full eps from the first step (epoch 1 of the demo's ramp trains
    near eps 0), PGD-3 (FGSM for fgsm_rs), AWP at gamma 0.005 when `awp`, and more dotted `overrides`."""
    attack = METHODS[method].attack or "pgd"
    keys = {
        "method.name": method,
        "method.awp_gamma": AWP_GAMMA if awp else 0.0,
        "attack.name": attack,
        "attack.num_steps": 1 if attack == "fgsm" else 3,
        "attack.step_size_factor": 1.25 if attack == "fgsm" else 2.5,
        "schedule.eps_ramp": "none",
        "run.mixed_precision": precision,
    }
    keys.update(overrides or {})
    return load_config(DEMO_CONFIG, overrides=keys)


def digits_architecture(path: Path, name: str = "small_cnn") -> dict[str, Any]:
    info = data.read_metadata(path)
    return architecture(
        ModelConfig(name=name), shape=info.shape, num_classes=info.num_classes, mean=info.mean, std=info.std
    )


def train_steps(config: Config, arch: dict, x: torch.Tensor, y: torch.Tensor, *, device, sizes: Sizes) -> dict:
    """`sizes.train_batches` minibatches of `config`'s method with train_epoch on `device`; the checks."""
    torch.manual_seed(config.run.seed)
    model = build_model(arch).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, config.optim)
    scheduler = make_scheduler(optimizer, config.optim, total_epochs=1, steps_per_epoch=sizes.train_batches)
    plan = plan_epoch(config, 1, steps_per_epoch=sizes.train_batches)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    indices = order[: sizes.train_batches * sizes.train_batch_size]
    sync(device)
    stats = train_epoch(
        model,
        model,
        tensor_batches(x, y, indices, sizes.train_batch_size),
        plan,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        generator=torch.Generator(device=device).manual_seed(0),
        precision=config.run.mixed_precision,
    )
    sync(device)
    loss = stats["loss_sum"] / stats["count"]
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    not_fp32 = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    off = tensors_off_device(model, optimizer, device)
    problems = failures(
        (math.isfinite(loss), f"loss {loss}"),
        (moved, "weights unchanged"),
        (not not_fp32, f"not fp32: {not_fp32[:3]}"),
        (not off, f"off {device}: {off[:3]}"),
    )
    return {"loss": loss, "seconds": stats["seconds"], "problems": problems}


def check_training(arch: dict, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, sizes: Sizes) -> dict:
    """Part 2: every method x precision x AWP for a few minibatches on `device`."""
    checks = []
    for method, spec in METHODS.items():
        for precision in ("none", "bf16"):
            for awp in (False, True):
                name = f"{method} {precision} awp={'on' if awp else 'off'}"
                if awp and not spec.weight_perturbation:
                    checks.append(check("training", name, None, f"skipped: {method} takes no AWP"))
                elif precision == "bf16" and not bf16_is_native(device):
                    checks.append(check("training", name, None, "skipped: emulated"))
                else:
                    config = training_config(method, awp=awp, precision=precision)
                    r = train_steps(config, arch, x, y, device=device, sizes=sizes)
                    detail = f"loss {r['loss']:.4f}, {r['seconds']:.2f}s" + "".join(f"; {p}" for p in r["problems"])
                    checks.append(check("training", name, not r["problems"], detail, loss=r["loss"]))
    return {"sizes": {"minibatches": sizes.train_batches, "batch_size": sizes.train_batch_size}, "checks": checks}


# ------------------------------------------------------------------ 3. every attack, device vs CPU
def reference_model(arch: dict, x: torch.Tensor, y: torch.Tensor, *, epochs: int) -> nn.Module:
    """small_cnn trained clean on the CPU (seeded, so every run attacks the same weights), in eval mode:
    attacks on a network at chance prove little."""
    config = training_config("standard")
    torch.manual_seed(0)
    model = build_model(arch)
    optimizer = make_optimizer(model, config.optim)
    steps = math.ceil(len(y) / config.data.batch_size)
    scheduler = make_scheduler(optimizer, config.optim, total_epochs=epochs, steps_per_epoch=steps)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        plan = plan_epoch(config, epoch, steps_per_epoch=steps)
        order = torch.randperm(len(y), generator=generator)
        batches = tensor_batches(x, y, order, config.data.batch_size)
        train_epoch(model, model, batches, plan, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"))
    return model.eval()


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """One attack on `device` (model already there): robust accuracy at ATTACK_EPS and the contract's breaches."""
    norm, options = ATTACK_OPTIONS[name]
    eps = math.inf if name in MINIMAL else ATTACK_EPS[norm]
    x, y = x.to(device), y.to(device)
    modes = [m.training for m in model.modules()]
    sync(device)
    started = time.perf_counter()
    x_adv = ATTACKS[name].fn(
        model, x, y, eps=eps, norm=norm, generator=torch.Generator(device=device).manual_seed(0), **options
    )
    sync(device)
    seconds = time.perf_counter() - started
    size = perturbation_norms(x, x_adv, norm)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    # A minimal-norm attack breaks an example when its adversarial lies within the radius (evaluate.worst_case).
    robust = clean & ~(fooled & (size <= ATTACK_EPS[norm] + 1e-5))
    problems = failures(
        (x_adv.device == device, f"x_adv on {x_adv.device}"),
        (not x_adv.requires_grad, "x_adv requires grad"),
        (float(size.max()) <= eps + 1e-5, f"outside the ball: {float(size.max()):.4f} > {eps}"),
        (float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1, "outside [0,1]"),
        (modes == [m.training for m in model.modules()], "train/eval mode changed"),
    )
    return {"robust_acc": float(robust.float().mean()), "seconds": seconds, "problems": problems}


def check_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device) -> dict:
    """Part 3: every registered attack on `device` (and, on CUDA, on the CPU with the same weights)."""
    on_device = copy.deepcopy(model).to(device).eval()
    tolerance = max(0.05, 3 / len(y))
    checks = []
    for name in ATTACKS:
        if name not in ATTACK_OPTIONS:
            checks.append(check("attacks", name, False, "no budget in gpu_check.ATTACK_OPTIONS: add one"))
            continue
        r = run_attack(name, on_device, x, y, device)
        numbers = {"robust_acc": r["robust_acc"], "seconds": r["seconds"], "cpu_robust_acc": NO_CUDA}
        detail = f"robust {r['robust_acc']:.3f} in {r['seconds']:.2f}s"
        if device.type == "cuda":
            ref = run_attack(name, model, x, y, torch.device("cpu"))
            numbers.update(cpu_robust_acc=ref["robust_acc"], cpu_seconds=ref["seconds"])
            diff = abs(r["robust_acc"] - ref["robust_acc"])
            detail += f", CPU {ref['robust_acc']:.3f} in {ref['seconds']:.2f}s"
            if diff > tolerance:
                r["problems"].append(f"differs from the CPU's by {diff:.3f} > {tolerance:.3f}")
        detail += "".join(f"; {p}" for p in r["problems"])
        checks.append(check("attacks", name, not r["problems"], detail, **numbers))
    return {"examples": len(y), "eps": ATTACK_EPS, "tolerance": tolerance, "checks": checks}


# ------------------------------------------------------------------ 4. two DDP ranks on one device
def _ddp_rank(rank: int, device_type: str, arch: dict, x, y, sizes: Sizes, folder: str) -> None:
    """One of 2 ranks: PGD-AT with AWP on its own shard; rank 0 writes whether the replicas are equal."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        world = LocalWorld(device)
        config = training_config("pgd_at", awp=True)
        torch.manual_seed(0)
        model = world.prepare_model(build_model(arch))
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        initial = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        optimizer = make_optimizer(model, config.optim)
        scheduler = make_scheduler(optimizer, config.optim, total_epochs=1, steps_per_epoch=sizes.ddp_steps)
        indices = torch.arange(rank, len(y), world.world_size)[: sizes.ddp_steps * sizes.ddp_batch_size]
        stats = train_epoch(
            model,
            net,
            tensor_batches(x, y, indices, sizes.ddp_batch_size),
            plan_epoch(config, 1, steps_per_epoch=sizes.ddp_steps),
            optimizer=optimizer,
            scheduler=scheduler,
            device=device,
            generator=torch.Generator(device=device).manual_seed(100 + rank),  # per-rank random starts
        )
        off = tensors_off_device(net, optimizer, device)
        states = world.all_gather_object({k: v.detach().cpu() for k, v in net.state_dict().items()})
        offs = world.all_gather_object(off)
        if rank == 0:
            unequal = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
            moved = any(not torch.equal(states[0][k], initial[k]) for k in initial)
            result = {"ddp": world.distributed, "unequal": unequal, "moved": moved, "off_device": offs}
            result |= {"loss": stats["loss_sum"] / stats["count"], "seconds": stats["seconds"]}
            Path(folder, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def check_ddp(arch: dict, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, sizes: Sizes) -> dict:
    """Part 4: 2 spawned ranks on `device`; their weights must be exactly equal after training."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as folder:
        started = time.perf_counter()
        mp.spawn(_ddp_rank, args=(device.type, arch, x, y, sizes, folder), nprocs=2, join=True)
        seconds = time.perf_counter() - started
        r = json.loads(Path(folder, "result.json").read_text())
    problems = failures(
        (r["ddp"], "not wrapped in DDP"),
        (not r["unequal"], f"replicas differ in {r['unequal'][:3]}"),
        (r["moved"], "weights unchanged"),
        (math.isfinite(r["loss"]), f"loss {r['loss']}"),
        *((not off, f"rank {rank} off {device}: {off[:3]}") for rank, off in enumerate(r["off_device"])),
    )
    detail = (
        f"2 ranks x {sizes.ddp_steps} steps pgd_at+AWP, gloo: replicas "
        f"{'identical' if not r['unequal'] else 'DIFFER'}, loss {r['loss']:.4f}, {seconds:.1f}s with spawn"
    )
    detail += "".join(f"; {p}" for p in problems)
    return {"checks": [check("ddp", "2 ranks, one device, AWP", not problems, detail, **r, spawn_seconds=seconds)]}


# ------------------------------------------------------------------ 5. Ray Train + evaluation end to end
def advtrain(args: list[str], log: Path, *, env: dict[str, str], timeout: float) -> tuple[int, float]:
    """`advtrain ARGS` from the repository root, output to `log`: (exit code, seconds)."""
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [str(Path(sys.executable).with_name("advtrain")), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode
    return code, time.perf_counter() - started


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def check_ray(*, device: torch.device, data_path: Path) -> dict:
    """Part 5: train 1 epoch on 1 Ray Train worker (with a GPU on CUDA), register, evaluate it (fast)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-ray-") as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ADVTRAIN_LOG_DIR": str(folder)}
        sets = {
            "run.epochs": 1,
            "scaling.num_workers": 1,
            "scaling.use_gpu": str(device.type == "cuda").lower(),
            "tracking.uri": uri,
            "tracking.experiment": "gpu-check",
            "tracking.registered_model": "gpu-check",
            "run.storage_path": folder / "runs",
            "data.path": data_path,
        }
        args = ["train", "--config", str(DEMO_CONFIG)] + [f"--set={k}={v}" for k, v in sets.items()]
        code, seconds = advtrain(args, folder / "train.log", env=env, timeout=300)
        checks = [check("ray", "advtrain train", code == 0, f"exit {code} in {seconds:.0f}s", seconds=seconds)]
        if code != 0:
            print(_tail(folder / "train.log"), file=sys.stderr)
            return {"checks": checks}
        checks.append(_trained_on(uri, device))
        args = ["evaluate", "--model", "models:/gpu-check@challenger", "--protocol", "fast", "--num-examples", "200"]
        code, seconds = advtrain([*args, "--out", str(folder / "eval")], folder / "eval.log", env=env, timeout=300)
        report_file = folder / "eval" / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if code != 0:
            print(_tail(folder / "eval.log"), file=sys.stderr)
    detail = f"exit {code} in {seconds:.0f}s, robust {report.get('robust_accuracy', float('nan')):.3f} (fast, 200)"
    checks.append(check("ray", "advtrain evaluate", code == 0, detail, seconds=seconds))
    return {"checks": [*checks, _report_device(report.get("device"), device)]}


def _trained_on(uri: str, device: torch.device) -> dict:
    """The training run's `advtrain.devices` tag (each rank's device) must name the checked device type."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gpu-check")
    runs = client.search_runs([experiment.experiment_id], max_results=1) if experiment else []
    devices = json.loads(runs[0].data.tags.get("advtrain.devices", "[]")) if runs else []
    ok = bool(devices) and all(d.split(":")[0].split(" ")[0] == device.type for d in devices)
    return check("ray", "trained on", ok, f"advtrain.devices = {devices}", devices=devices)


def _report_device(entry: dict | None, device: torch.device) -> dict:
    """report.json's "device" entry must name the device the check runs on (recorded as missing until
    the evaluation writes one)."""
    if entry is None:
        return check("ray", "report device", None, 'not run: report.json has no "device" entry yet')
    ok = entry.get("type") == device.type
    return check("ray", "report device", ok, f"{entry}", device_entry=entry)


# ------------------------------------------------------------------ 6. throughput
def training_throughput(device: torch.device, *, sizes: Sizes, precision: str) -> float:
    """FGSM-RS training images/s of PreActResNet-18 on synthetic uniform 3x32x32 data at eps 8/255."""
    arch = architecture(
        ModelConfig(name="preact_resnet18"), shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    config = training_config("fgsm_rs", precision=precision, overrides={"attack.eps": 8 / 255})
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    optimizer = make_optimizer(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = plan_epoch(config, 1, steps_per_epoch=sizes.throughput_steps)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(sizes.throughput_batch, 3, 32, 32, device=device, generator=generator)
    y = torch.randint(0, 10, (sizes.throughput_batch,), device=device, generator=generator)

    def seconds(steps: int) -> float:
        sync(device)
        started = time.perf_counter()
        train_epoch(
            model, model, [(x, y)] * steps, plan, optimizer=optimizer, scheduler=scheduler, device=device,
            generator=generator, precision=precision,
        )  # fmt: skip
        sync(device)
        return time.perf_counter() - started

    seconds(sizes.throughput_warmup)  # cuDNN's algorithm choice, allocator growth, autocast's caches
    return sizes.throughput_steps * sizes.throughput_batch / seconds(sizes.throughput_steps)


def evaluation_throughput(device: torch.device, *, sizes: Sizes) -> tuple[float, list[str]]:
    """evaluate_chunk's examples/s (fast protocol, Linf 8/255) on PreActResNet-18, and where its result
    tensors are not on the CPU. Labels are the model's own predictions, so every attack runs on every example."""
    arch = architecture(
        ModelConfig(name="preact_resnet18"), shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    torch.manual_seed(0)
    model = build_model(arch).to(device).eval()
    x = torch.rand(sizes.eval_examples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x.to(device)).argmax(1).cpu()
    sync(device)
    started = time.perf_counter()
    result = evaluate_chunk(model, x, y, start=0, norm="linf", eps=8 / 255, protocol="fast", seed=0, device=device)
    seconds = time.perf_counter() - started
    outputs = {"clean_correct": result.clean_correct, "predicted_adv": result.predicted_adv, **result.robust_after}
    if result.grid_x_adv is not None:
        outputs["grid_x_adv"] = result.grid_x_adv
    return sizes.eval_examples / seconds, [name for name, t in outputs.items() if t.device.type != "cpu"]


def check_throughput(device: torch.device, *, sizes: Sizes) -> dict:
    """Part 6: training images/s in fp32 and bf16, evaluation examples/s (on the CPU only a smoke test)."""
    checks, rates = [], {}
    for precision in ("none", "bf16"):
        name = f"train fgsm_rs preact18 {'fp32' if precision == 'none' else 'bf16'}"
        if precision == "bf16" and not bf16_is_native(device):
            checks.append(check("throughput", name, None, "skipped: emulated"))
            continue
        rates[precision] = training_throughput(device, sizes=sizes, precision=precision)
        detail = f"{rates[precision]:.0f} images/s (batch {sizes.throughput_batch}, {sizes.throughput_steps} steps)"
        checks.append(check("throughput", name, math.isfinite(rates[precision]), detail, images_per_s=rates[precision]))
    rate, not_cpu = evaluation_throughput(device, sizes=sizes)
    detail = f"{rate:.1f} examples/s ({sizes.eval_examples} examples)" + (f"; not on CPU: {not_cpu}" if not_cpu else "")
    checks.append(check("throughput", "evaluate_chunk fast preact18", not not_cpu, detail, examples_per_s=rate))
    speedup = rates["none"] / rates["bf16"] if "bf16" in rates else None
    return {"sizes": asdict(sizes), "bf16_speedup": 1 / speedup if speedup else None, "checks": checks}


# ------------------------------------------------------------------ 7. the gpu tests
def check_pytest(device: torch.device) -> dict:
    """Part 7: `pytest -m gpu tests/gpu` (on the CPU they skip: a pass that proves only that they collect)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    detail = f"{summary} (exit {proc.returncode}, {seconds:.0f}s)" + ("" if device.type == "cuda" else "; no CUDA")
    return {"checks": [check("pytest", "pytest -m gpu tests/gpu", proc.returncode == 0, detail, summary=summary)]}


# ------------------------------------------------------------------ the run
def guarded(name: str, fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    """fn's result with its status and seconds; an exception is a failed part (traceback on stderr)."""
    started = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # a checklist: record the failure and go on to the next part
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}", "checks": [check(name, "raised", False, repr(err)[:300])]}
    return {"status": part_status(result["checks"]), "seconds": round(time.perf_counter() - started, 2), **result}


def run_parts(device: torch.device, *, sizes: Sizes, data_path: Path, skip_ray: bool) -> dict[str, dict]:
    """Parts 1-7 in order on `device`."""
    if not (data_path / "metadata.json").is_file():
        data.prepare_digits(data_path)  # what the Makefile's data/digits/metadata.json rule does
    arch = digits_architecture(data_path)
    x_train, y_train = data.load_split(data_path, "train")
    x_test, y_test = data.load_split(data_path, "test")
    x_test, y_test = x_test[: sizes.attack_examples], y_test[: sizes.attack_examples]
    parts = {"environment": guarded("environment", environment, device)}
    parts["training"] = guarded("training", check_training, arch, x_train, y_train, device=device, sizes=sizes)
    model = reference_model(arch, x_train, y_train, epochs=sizes.reference_epochs)
    parts["attacks"] = guarded("attacks", check_attacks, model, x_test, y_test, device=device)
    parts["ddp"] = guarded("ddp", check_ddp, arch, x_train, y_train, device=device, sizes=sizes)
    if skip_ray:
        parts["ray"] = {
            "status": "not run: --skip-ray",
            "checks": [check("ray", "train + evaluate", None, "not run: --skip-ray")],
        }
    else:
        parts["ray"] = guarded("ray", check_ray, device=device, data_path=data_path)
    parts["throughput"] = guarded("throughput", check_throughput, device, sizes=sizes)
    parts["pytest"] = guarded("pytest", check_pytest, device)
    return parts


def write_results(results: dict[str, Any], out: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (one row per part, then the headline numbers) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    parts = results["parts"]
    rows = [
        f"# gpu-check ({results['mode']}): {'PASSED' if results['passed'] else 'FAILED'}",
        "",
        f"{results['date']}, {results['seconds']:.0f} s in all; every number is in gpu_check.json.",
        f"{parts['environment']['checks'][0]['detail']}.",
        "",
        "| part | status | seconds | checks passed | failed |",
        "|---|---|---:|---:|---|",
    ]
    for name, part in parts.items():
        passed = sum(c["status"] == "pass" for c in part["checks"])
        failed = ", ".join(c["check"] for c in part["checks"] if c["status"] == "fail") or "-"
        rows.append(
            f"| {name} | {part['status']} | {part.get('seconds', 0):.1f} | {passed}/{len(part['checks'])} | {failed} |"
        )
    rows.append("")
    for name in ("ddp", "ray", "throughput"):
        rows += [f"- {name}, {c['check']}: {c['detail']}" for c in parts.get(name, {}).get("checks", [])]
    (out / "gpu_check.md").write_text("\n".join(rows) + "\n")


def results_dir(*, cpu: bool) -> Path:
    """Where a run writes: benchmarks/results/gpu/, or its cpu/ folder for --cpu (never the GPU figures)."""
    return RESULTS / "cpu" if cpu else RESULTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the parts that need no CUDA on the CPU")
    parser.add_argument("--skip-ray", action="store_true", help="leave out part 5 (Ray Train + evaluation)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/gpu[/cpu])")
    parser.add_argument("--data", type=Path, default=DIGITS, help="digits folder (prepared when missing)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(
            f"gpu-check: CUDA is absent (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            "torch.cuda.is_available() is False). Run it on a GPU node, or pass --cpu "
            '(make gpu-check GPU_CHECK_ARGS="--cpu") for the parts that need no CUDA.',
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    parts = run_parts(device, sizes=CPU if args.cpu else GPU, data_path=args.data.resolve(), skip_ray=args.skip_ray)
    passed = all(part["status"] != "fail" for part in parts.values())
    results = {"mode": device.type, "date": date, "seconds": time.perf_counter() - started, "passed": passed}
    out = args.out or results_dir(cpu=args.cpu)
    write_results({**results, "parts": parts}, out)
    print(f"gpu-check {'PASSED' if passed else 'FAILED'} in {results['seconds']:.0f}s: {out / 'gpu_check.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
