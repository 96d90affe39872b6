"""Pure-torch training and validation: one epoch, one evaluation. No ray, no mlflow.

Functions return sums and counts (not means) so that callers can all-reduce them across ranks and
divide once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.attacks import pgd
from pipeline.config import AttackConfig, Config, MethodConfig, OptimConfig
from pipeline.methods import Method, method_spec
from pipeline.schedules import lr_factor


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=False
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


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
    """Mini-batches of an in-memory split in the given order (the last partial batch is kept)."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        yield x[idx], y[idx]


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


def perturb_weights(
    network: nn.Module, loss_fn: Callable[[], torch.Tensor], *, gamma: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Adversarial weight perturbation (Wu, Xia & Wang 2020, arXiv:2004.05884, "Adversarial weight
    perturbation helps robust generalization"): move every conv / linear weight of `network` (the
    tensors with more than one dimension; biases and norm scales stay) by `gamma` times its own norm
    along the gradient of `loss_fn()`, the method's loss on its adversarial examples. Returns the
    (weight, shift) pairs to undo with `restore_weights` once the backward is done.

    One gradient-ascent step, normalised per layer, is what the paper's proxy model computes. The pass
    runs in train mode, as there; BatchNorm running statistics are put back so it leaves no trace.
    Call it inside the method's autocast region, like the rest of the method.
    """
    weights = [param for param in network.parameters() if param.requires_grad and param.dim() > 1]
    buffers = [buffer.clone() for buffer in network.buffers()]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    shifts = []
    with torch.no_grad():
        for buffer, saved in zip(network.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        for weight, grad in zip(weights, grads, strict=True):
            if grad is None:
                continue
            grad = grad.float()
            shift = grad * (gamma * weight.norm() / (grad.norm() + 1e-20))
            weight.add_(shift)
            shifts.append((weight, shift))
    # Under autocast the bf16 copies of the weights are cached until the autocast region ends, and the
    # cache does not see in-place changes: without this the method's loss would be taken at the
    # unperturbed weights in bf16 (AWP silently off).
    torch.clear_autocast_cache()
    return shifts


def restore_weights(shifts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo `perturb_weights`. The training loop does it between the backward and the optimizer step, as SAM
    does (Foret et al. 2021): the gradient is the perturbed point's, the step (weight decay and momentum
    included) starts from the unperturbed weights. Wu et al. undo after the step; that differs by
    lr x weight_decay x shift, and under DDP, where each rank perturbs along its own shard's gradient,
    it would let the replicas drift apart by that much every step."""
    with torch.no_grad():
        for weight, shift in shifts:
            weight.sub_(shift)


def train_epoch(
    model: nn.Module,
    attack_model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    method: Method,
    attack: AttackConfig,
    eps_for_step: Callable[[int], float],
    attack_mode: str,
    device: torch.device,
    generator: torch.Generator | None = None,
    replays: int = 1,
    mixed_precision: str = "none",
    augment: str = "none",
    awp_gamma: float = 0.0,
    on_step: Callable[[int, float], bool] | None = None,
    after_optimizer_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns sums: loss_sum, correct, count, seconds, last eps and lr.

    `replays` > 1 (free_at) steps the optimizer that many times on each minibatch; the sums then count
    every replay. `mixed_precision="bf16"` runs the method (attack generation and loss forward) under
    bf16 autocast on the device's type; weights, optimizer state and gradients stay fp32. It takes the
    resolved setting ("none" or "bf16"; `training_precision` resolves "auto").
    `awp_gamma` > 0 adds adversarial weight perturbation (`perturb_weights`) to every step: the method's
    loss and its gradient are taken at the perturbed weights, the perturbation is undone, then the
    optimizer steps. Each rank perturbs along its own shard's gradient (no extra all-reduce); the
    all-reduced gradient steps identical unperturbed replicas, so they stay identical. The reported loss
    and accuracy are those at the perturbed weights.
    `on_step(step, seconds)` is called after each minibatch (all its replays) with that minibatch's
    training time; returning True ends the pass there (benchmarks that evaluate mid-epoch).
    `after_optimizer_step()` runs after every optimizer step (the weight average's update).
    """
    if mixed_precision not in ("none", "bf16"):
        raise ValueError(
            f"train_epoch takes mixed_precision 'none' or 'bf16', not '{mixed_precision}' (resolve 'auto' first)"
        )
    model.train()
    loss_sum = correct = count = 0.0
    eps = 0.0
    started = time.perf_counter()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    shifts: list[tuple[torch.Tensor, torch.Tensor]] = []
    awp: dict[str, Callable[[Callable[[], torch.Tensor]], None]] = {}
    if awp_gamma > 0:
        awp["perturb_weights"] = lambda loss_fn: shifts.extend(perturb_weights(attack_model, loss_fn, gamma=awp_gamma))
    for step, (x, y) in enumerate(batches):
        step_started = time.perf_counter()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if augment == "crop_flip":
            x = crop_flip(x, generator)
        eps = eps_for_step(step)
        for _ in range(replays):
            with autocast:
                loss, logits = method(
                    model,
                    attack_model,
                    x,
                    y,
                    attack=attack,
                    eps=eps,
                    attack_mode=attack_mode,
                    generator=generator,
                    **awp,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            restore_weights(shifts)
            shifts.clear()
            optimizer.step()
            scheduler.step()
            if after_optimizer_step is not None:
                after_optimizer_step()
            with torch.no_grad():
                loss_sum += float(loss) * len(y)
                correct += float((logits.argmax(1) == y).sum())
                count += len(y)
        if on_step is not None and on_step(step, time.perf_counter() - step_started):
            break
    return {
        "loss_sum": loss_sum,
        "correct": correct,
        "count": count,
        "seconds": time.perf_counter() - started,
        "eps": eps,
        "lr": optimizer.param_groups[0]["lr"],
    }


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted labels for x (pixels in [0,1]); the caller sets the mode (eval for evaluation)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(x[start : start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def clean_and_robust_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    num_steps: int,
    step_size_factor: float,
    num_restarts: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Counts of clean and PGD-robust correct predictions (model in eval mode, restored after).

    Robust counts a point only if it is also clean-correct, so robust <= clean always holds.
    """
    was_training = model.training
    model.eval()
    clean = robust = 0.0
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
            clean += float(ok.sum())
            if eps > 0:
                x_adv = pgd(
                    model,
                    xb,
                    yb,
                    eps=eps,
                    step_size=step_size_factor * eps / num_steps,
                    num_steps=num_steps,
                    norm=norm,  # type: ignore[arg-type]
                    num_restarts=num_restarts,
                    generator=generator,
                )
                with torch.no_grad():
                    ok = ok & (model(x_adv).argmax(1) == yb)
            robust += float(ok.sum())
    finally:
        model.train(was_training)
    return {"clean_correct": clean, "robust_correct": robust, "count": float(len(x))}


def pgd20_correct(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, device: torch.device
) -> dict[str, float]:
    """Clean and robust counts under the reporting protocol of benchmarks/RESULTS.md: PGD-20, step
    2.5 eps / 20, one random start from a generator seeded 0, batches of 500. One place, so that every
    benchmark's "PGD-20" column means the same attack."""
    return clean_and_robust_correct(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        num_steps=20,
        step_size_factor=2.5,
        num_restarts=1,
        batch_size=500,
        device=device,
        generator=torch.Generator().manual_seed(0),
    )


def fit_plain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: Config,
    device: torch.device | None = None,
    on_step: Callable[[int, int, float], bool] | None = None,
) -> list[dict[str, float]]:
    """The training a Ray worker does, in one process with no Ray: the same method, attack, eps and LR
    schedules and data order as rank 0 of a 1-worker run. For quick experiments, tests, and the
    plain-torch baseline of the Ray-overhead benchmark. Returns per-epoch train stats.

    `on_step(epoch, step, seconds)` runs after every minibatch (step counts from 0 within the epoch);
    returning True stops training there, e.g. once a mid-epoch evaluation reaches a target.

    With `run.weight_average_decay` > 0 the weight average is kept as on a Ray worker, and `model` holds
    it when this returns, as a Ray run registers it; `on_step` still sees the trained weights."""
    from pipeline.data import shard_indices
    from pipeline.methods import get_method
    from pipeline.methods import replays as method_replays

    device = device or torch.device("cpu")
    model.to(device)
    optimizer = make_optimizer(model, config.optim)
    steps = -(-len(y) // config.data.batch_size)
    replays = method_replays(config.method.name, config.method.replays)
    scheduler = make_scheduler(optimizer, config.optim, total_epochs=config.run.epochs, steps_per_epoch=steps * replays)
    method = get_method(config.method.name, config.method)
    stats = []
    stopped = False
    from pipeline.training.state import WeightAverage

    decay = config.run.weight_average_decay
    averaging = WeightAverage(model, decay=decay) if decay > 0 else None
    precision = training_precision(config.run.mixed_precision, bf16_native=bf16_is_native(device))

    def step_hook(epoch: int, step: int, seconds: float) -> bool:
        nonlocal stopped
        stopped = on_step is not None and on_step(epoch, step, seconds)
        return stopped

    for epoch in range(1, config.run.epochs + 1):
        generator = torch.Generator(device=device).manual_seed(config.run.seed * 1_000_003 + epoch * 1009)
        indices = shard_indices(len(y), rank=0, world_size=1, epoch=epoch, seed=config.run.seed)

        eps_for_step, epoch_attack = epoch_schedule(config, epoch, steps_per_epoch=steps)

        stats.append(
            train_epoch(
                model,
                model,
                tensor_batches(x, y, indices, config.data.batch_size),
                optimizer=optimizer,
                scheduler=scheduler,
                method=method,
                attack=epoch_attack,
                eps_for_step=eps_for_step,
                attack_mode=config.method.attack_mode,
                device=device,
                generator=generator,
                replays=replays,
                mixed_precision=precision,
                augment=config.data.augment,
                awp_gamma=weight_perturbation_gamma(config.method, epoch),
                on_step=None if on_step is None else functools.partial(step_hook, epoch),
                after_optimizer_step=None if averaging is None else functools.partial(averaging.update, model),
            )
        )
        if stopped:
            break
    if averaging is not None:
        model.load_state_dict(averaging.model.state_dict())
    return stats


def epoch_schedule(config: Config, epoch: int, *, steps_per_epoch: int) -> tuple[Callable[[int], float], AttackConfig]:
    """This epoch's eps-by-step function and attack config (attack steps may grow over training)."""
    from pipeline.schedules import attack_steps_at, eps_by_step

    schedule, attack = config.schedule, config.attack
    eps_for_step = eps_by_step(
        epoch,
        steps_per_epoch=steps_per_epoch,
        eps=attack.eps * schedule.eps_train_factor,
        ramp=schedule.eps_ramp,
        ramp_epochs=schedule.eps_ramp_epochs,
        milestones=schedule.eps_milestones,
    )
    num_steps = attack_steps_at(
        epoch, start=schedule.steps_start, final=attack.num_steps, ramp_epochs=schedule.steps_ramp_epochs
    )
    return eps_for_step, attack.model_copy(update={"num_steps": num_steps})


def collapsed(probe_acc: float, best_probe_acc: float, *, drop: float) -> bool:
    """Catastrophic overfitting (Wong et al. 2020): PGD accuracy on the fixed probe batch falls more than
    `drop` below the best it reached. Single-step training then yields a model that FGSM cannot fool
    but PGD fools almost always; the collapse happens within an epoch, so one epoch's drop is enough."""
    return probe_acc < best_probe_acc - drop


def weight_perturbation_gamma(method: MethodConfig, epoch: int) -> float:
    """`method.awp_gamma` from the epoch after `method.awp_warmup_epochs` on, 0 (no AWP) before it."""
    return method.awp_gamma if epoch > method.awp_warmup_epochs else 0.0


def fallback_attack(attack: AttackConfig, *, num_steps: int) -> AttackConfig:
    """The safer training attack after a collapse: PGD-`num_steps` with random start and the usual
    2.5 * eps / steps step (smaller steps than the single-step or few-step attack that collapsed)."""
    return attack.model_copy(
        update={"name": "pgd", "num_steps": num_steps, "step_size_factor": 2.5, "step_size": 0.0, "random_start": True}
    )


def fallback_training(method_name: str, attack: AttackConfig, *, min_steps: int) -> tuple[str, AttackConfig]:
    """What a run trains with after a collapse. Single-step methods switch to pgd_at with PGD-`min_steps`.
    Few-step PGD collapses too (MART with PGD-3 did on Fashion-MNIST at the one-cycle peak, see
    benchmarks/RESULTS.md), so a multi-step method keeps its objective with twice the attack steps."""
    if method_spec(method_name).single_step:
        return "pgd_at", fallback_attack(attack, num_steps=min_steps)
    return method_name, fallback_attack(attack, num_steps=max(min_steps, 2 * attack.num_steps))
