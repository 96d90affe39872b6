"""One training epoch and what it is built from: optimizer and LR-scheduler factories, in-memory batches,
augmentation, the precision a worker trains in. Pure torch: no ray, no mlflow.

`train_epoch` returns sums and counts (not means) so that callers can all-reduce them across ranks and
divide once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.data import to_float
from pipeline.models import input_memory_format
from pipeline.schedules import lr_factor
from pipeline.training.perturbation import perturb_weights, restore_weights
from pipeline.training.plan import EpochPlan


def make_optimizer(model: nn.Module, config: OptimConfig, *, head: set[str] = frozenset()) -> torch.optim.Optimizer:
    """SGD or Adam over the model's parameters; with optim.backbone_lr_scale < 1, the parameters named in
    `head` (the new head of a fine-tuning run) form the first group at optim.lr and every other parameter a
    second group at optim.lr x backbone_lr_scale (the LR schedule multiplies both)."""
    groups: list[dict] | object = model.parameters()
    if config.backbone_lr_scale < 1.0:
        named = list(model.named_parameters())
        # A DDP wrapper prefixes every name with "module."
        is_head = {name: name.removeprefix("module.") in head for name, _ in named}
        groups = [
            {"params": [p for name, p in named if is_head[name]], "lr": config.lr},
            {"params": [p for name, p in named if not is_head[name]], "lr": config.lr * config.backbone_lr_scale},
        ]
    if config.name == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=False
        )
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, *, total_epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule; its state (the step count) is checkpointed, the function is rebuilt."""
    steps = max(steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step / steps,
            total_epochs=total_epochs,
            kind=config.lr_schedule,
            milestones=config.lr_milestones,
            decay=config.lr_decay,
        ),
    )


def tensor_batches(
    x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of an in-memory split in the given order (the last partial batch is kept), gathered
    where x lives (a split placed on the GPU is batched there)."""
    indices = indices.to(x.device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        if x.is_pinned():
            # Gathered into pinned memory (torch caches those blocks), or the copy to the GPU would block.
            xb = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device="cpu", pin_memory=True)
            yield torch.index_select(x, 0, idx, out=xb), y[idx]
        else:
            yield x[idx], y[idx]


def place_split(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, *, max_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where an in-memory training split lives: on the GPU when it takes at most `max_fraction` of the
    free GPU memory (uint8 pixels: CIFAR-10's train split is 150 MB), else in pinned host memory so that
    `non_blocking` copies overlap with compute; on a CPU device, as it is."""
    if device.type != "cuda":
        return x, y
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() <= max_fraction * free_bytes:
        return x.to(device), y.to(device)
    return x.pin_memory(), y.pin_memory()


def device_batch(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on `device` as float32 pixels in [0,1]: uint8 batches (4x fewer bytes to move) become
    float there."""
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    return (to_float(x) if x.dtype == torch.uint8 else x), y


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image back to its size, then a random horizontal flip, per example
    (the CIFAR-10 augmentation of He et al. 2016 used by Madry, Wong, Rice et al.)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + offsets[0][:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + offsets[1][:, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` does bf16 arithmetic in hardware: CUDA from compute capability 8.0 (Ampere), x86
    CPUs with AVX-512-BF16 or AMX. Elsewhere bf16 autocast is emulated and slower than fp32, by ~15x for
    our training steps on an AVX2-only CPU (benchmarks/mixed_precision.py), so "auto" must not pick it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # Private probes of torch's own cpuinfo (there is no public one); a torch without them gets fp32,
        # the safe side.
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(avx512_bf16() or amx())
    return False


def training_precision(setting: str, *, bf16_native: bool) -> str:
    """`run.mixed_precision` as a worker runs it: "auto" is "bf16" where bf16 is native (bf16_is_native)
    and "none" elsewhere; "bf16" and "none" are taken as given (an explicit "bf16" on emulating hardware
    still runs bf16, with a warning from the caller: tests and numerics checks want exactly that)."""
    if setting == "auto":
        return "bf16" if bf16_native else "none"
    if setting in ("none", "bf16"):
        return setting
    raise ValueError(f"run.mixed_precision = '{setting}'; allowed: none, bf16, auto")


def train_epoch(
    model: nn.Module,
    attack_model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    plan: EpochPlan,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    generator: torch.Generator | None = None,
    precision: str = "none",
    on_step: Callable[[int, float], bool] | None = None,
    after_optimizer_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over `batches` as `plan` says; returns sums: loss_sum, correct, count, seconds, last eps
    and lr. `model` is what trains (DDP-wrapped under DDP), `attack_model` the unwrapped replica that
    attacks run on (no gradient all-reduce per attack step).

    `plan.replays` > 1 (free_at) steps the optimizer that many times on each minibatch; the sums then
    count every replay. `precision="bf16"` runs the method (attack generation and loss forward) under
    bf16 autocast on the device's type; weights, optimizer state and gradients stay fp32. It takes the
    resolved setting ("none" or "bf16"; `training_precision` resolves "auto").
    `plan.awp_gamma` > 0 adds adversarial weight perturbation (`perturb_weights`) to every step: the
    method's loss and its gradient are taken at the perturbed weights, the perturbation is undone, then
    the optimizer steps. Each rank perturbs along its own shard's gradient (no extra all-reduce); the
    all-reduced gradient steps identical unperturbed replicas, so they stay identical (the restore is
    exact). The reported loss and accuracy are those at the perturbed weights. Sums stay on the device
    until the end of the pass (one read-back per epoch).
    `on_step(step, seconds)` is called after each minibatch (all its replays) with that minibatch's
    training time; returning True ends the pass there (benchmarks that evaluate mid-epoch).
    `after_optimizer_step()` runs after every optimizer step (the weight average's update).
    """
    if precision not in ("none", "bf16"):
        raise ValueError(f"train_epoch takes precision 'none' or 'bf16', not '{precision}' (resolve 'auto' first)")
    model.train()
    # Sums stay on the device: reading a loss back every step would stall a GPU's queue once per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count, eps, started = 0, 0.0, time.perf_counter()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    layout = input_memory_format(attack_model)
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    options = {"attack": plan.attack, "attack_mode": plan.attack_mode, "generator": generator}
    options.update(_awp_hook(plan, attack_model, originals))
    for step, (x, y) in enumerate(batches):
        step_started = time.perf_counter()
        x, y = _device_input(x, y, plan, device=device, generator=generator, layout=layout)
        eps = plan.eps_for_step(step)
        for _ in range(plan.replays):
            with autocast:
                loss, logits = plan.method(model, attack_model, x, y, eps=eps, **options)
            _optimizer_step(loss, originals, optimizer, scheduler, after_optimizer_step)
            with torch.no_grad():
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == y).sum()
            count += len(y)
        if on_step is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's time, not its launch's (benchmarks only)
            if on_step(step, time.perf_counter() - step_started):
                break
    sums = {"loss_sum": float(loss_sum), "correct": float(correct), "count": float(count)}  # one sync per epoch
    return {**sums, "seconds": time.perf_counter() - started, "eps": eps, "lr": optimizer.param_groups[0]["lr"]}


def _awp_hook(plan: EpochPlan, attack_model: nn.Module, originals: list) -> dict[str, Callable]:
    """The method's `perturb_weights` argument when AWP is on: it perturbs and keeps the originals."""
    if plan.awp_gamma <= 0:
        return {}
    return {
        "perturb_weights": lambda loss_fn: originals.extend(
            perturb_weights(attack_model, loss_fn, gamma=plan.awp_gamma)
        )
    }


def _device_input(x, y, plan: EpochPlan, *, device: torch.device, generator, layout) -> tuple:
    """A batch on the device as float pixels, augmented as the plan says, in the model's memory format."""
    x, y = device_batch(x, y, device)
    if plan.augment == "crop_flip":
        x = crop_flip(x, generator)
    return x.contiguous(memory_format=layout), y


def _optimizer_step(loss, originals: list, optimizer, scheduler, after_optimizer_step) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    restore_weights(originals)  # between the backward and the step: see restore_weights
    originals.clear()
    optimizer.step()
    scheduler.step()
    if after_optimizer_step is not None:
        after_optimizer_step()
