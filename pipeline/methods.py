"""Training objectives: `method(model, attack_model, x, y, *, ...) -> (loss, logits)`.

`model` is what the optimizer steps (DDP-wrapped under Ray Train), `attack_model` the same network
unwrapped: attacks run on it so their input-gradient passes never trigger DDP's all-reduce. The
method states the BatchNorm mode for attack generation (`attack_mode`) and puts the model back in
train mode for the loss.

Every method but free_at takes `perturb_weights`: a callable the training loop passes for adversarial
weight perturbation (`pipeline/training/perturbation.py: perturb_weights`, Wu et al. 2020). The method hands it its own
loss on the examples it just generated, computed on `attack_model`; the callable moves the weights, and
the loss the method returns is then computed at the moved weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import ATTACKS
from pipeline.attacks.pgd import _per_example_norm
from pipeline.config import AttackConfig, MethodConfig
from pipeline.schedules import step_size

MethodResult = tuple[torch.Tensor, torch.Tensor]


def _generate(
    attack_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: AttackConfig,
    eps: float,
    attack_mode: str,
    generator: torch.Generator | None,
    name: str | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The configured attack (or `name`, with a custom per-example `loss`) in the stated BN mode."""
    spec = ATTACKS[name or attack.name]
    options = {
        "step_size": step_size(
            eps, num_steps=attack.num_steps, factor=attack.step_size_factor, absolute=attack.step_size
        ),
        "num_steps": attack.num_steps,
        "random_start": attack.random_start,
        "num_restarts": attack.num_restarts,
    }
    # Each training attack takes only the options it has (DeepFool: its iteration count).
    options = {key: value for key, value in options.items() if key in spec.training_options}
    extra = {} if loss is None else {"loss": loss}
    attack_model.train(attack_mode == "train")
    try:
        return spec.fn(attack_model, x, y, eps=eps, norm=attack.norm, generator=generator, **options, **extra)
    finally:
        attack_model.train(True)


WeightPerturbation = Callable[[Callable[[], torch.Tensor]], None]


def _objective_at(
    objective: Callable[[nn.Module], MethodResult],
    model: nn.Module,
    attack_model: nn.Module,
    perturb_weights: WeightPerturbation | None,
) -> MethodResult:
    """objective(model), after `perturb_weights` has moved the weights along objective(attack_model)'s
    gradient when AWP is on (the unwrapped network: that gradient is per rank, no all-reduce)."""
    if perturb_weights is not None:
        perturb_weights(lambda: objective(attack_model)[0])
    return objective(model)


def _cross_entropy_on(inputs: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], MethodResult]:
    def objective(net: nn.Module) -> MethodResult:
        logits = net(inputs)
        return F.cross_entropy(logits, y), logits

    return objective


def standard(
    model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, perturb_weights=None
) -> MethodResult:
    """Plain empirical risk minimisation on clean inputs (the baseline)."""
    return _objective_at(_cross_entropy_on(x, y), model, attack_model, perturb_weights)


def pgd_at(
    model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, perturb_weights=None
) -> MethodResult:
    """PGD adversarial training (Madry et al. 2018, arXiv:1706.06083): minimise the loss on PGD examples."""
    if eps == 0:
        return _objective_at(_cross_entropy_on(x, y), model, attack_model, perturb_weights)  # standard training
    x_adv = _generate(attack_model, x, y, attack=attack, eps=eps, attack_mode=attack_mode, generator=generator)
    return _objective_at(_cross_entropy_on(x_adv, y), model, attack_model, perturb_weights)


def fgsm_rs(
    model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, perturb_weights=None
) -> MethodResult:
    """FGSM with random start (Wong, Rice & Kolter 2020, arXiv:2001.03994, "Fast is better than free").

    Uniform start in the eps-ball, one signed step of `step_size_factor * eps` (1.25 in the paper).
    Same objective as pgd_at; the attack config (name fgsm, num_steps 1) makes it single-step.
    """
    return pgd_at(
        model,
        attack_model,
        x,
        y,
        attack=attack,
        eps=eps,
        attack_mode=attack_mode,
        generator=generator,
        perturb_weights=perturb_weights,
    )


def _clean_and_adversarial_logits(model, x, x_adv) -> tuple[torch.Tensor, torch.Tensor]:
    # One forward over both halves: under DDP two forwards feeding one backward would mark each
    # parameter ready twice ("Expected to mark a variable ready only once"). BatchNorm then sees the
    # mixed batch; small_cnn has none, and for BN models this is the common practical choice.
    # The logits leave in fp32 whatever the autocast: the losses built on them (TRADES's KL, MART's
    # log(1.0001 - p)) break in bf16's 8-bit mantissa, where 1.0001 - p rounds to 0 once a wrong class is
    # confident, so log(1 - p) drops from -9.2 to -27.6 and its gradient explodes.
    logits = model(torch.cat([x, x_adv])).float()
    return logits[: len(x)], logits[len(x) :]


def trades(
    model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, beta=6.0, perturb_weights=None
) -> MethodResult:
    """TRADES (Zhang et al. 2019, arXiv:1901.08573): CE(f(x), y) + beta * KL(f(x) || f(x_adv)).

    x_adv maximises the KL divergence from the clean prediction (PGD on the KL, the attack config's
    steps and step size). beta trades clean accuracy for robustness; beta = 0 is standard training.
    """
    if eps == 0 or beta == 0:
        return _objective_at(_cross_entropy_on(x, y), model, attack_model, perturb_weights)  # standard training
    attack_model.train(attack_mode == "train")
    try:
        with torch.no_grad():
            clean_probs = F.softmax(attack_model(x).float(), dim=1)
    finally:
        attack_model.train(True)

    def kl_to_clean(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="none").sum(1)

    x_adv = _generate(
        attack_model,
        x,
        y,
        attack=attack,
        eps=eps,
        attack_mode=attack_mode,
        generator=generator,
        name="pgd",
        loss=kl_to_clean,
    )

    def objective(net: nn.Module) -> MethodResult:
        logits, logits_adv = _clean_and_adversarial_logits(net, x, x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * robust, logits_adv

    return _objective_at(objective, model, attack_model, perturb_weights)


def mart(
    model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, beta=6.0, perturb_weights=None
) -> MethodResult:
    """MART (Wang et al. 2020, ICLR, "Improving adversarial robustness requires revisiting misclassified
    examples"): boosted CE on x_adv + beta * KL(f(x) || f(x_adv)) weighted by (1 - p_y(x)), so that
    misclassified examples weigh more. x_adv from the configured attack (PGD-CE)."""
    if eps == 0:
        return _objective_at(_cross_entropy_on(x, y), model, attack_model, perturb_weights)  # standard training
    x_adv = _generate(attack_model, x, y, attack=attack, eps=eps, attack_mode=attack_mode, generator=generator)

    def objective(net: nn.Module) -> MethodResult:
        logits, logits_adv = _clean_and_adversarial_logits(net, x, x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        top2 = adv_probs.argsort(dim=1)[:, -2:]
        # The most likely wrong class on the adversarial input.
        other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), other)
        clean_probs = F.softmax(logits, dim=1)
        true_probs = clean_probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(1)
        return boosted_ce + beta * (kl * (1.0000001 - true_probs)).mean(), logits_adv

    return _objective_at(objective, model, attack_model, perturb_weights)


def free_at(model, attack_model, x, y, *, attack, eps, attack_mode, generator=None, perturbation: dict) -> MethodResult:
    """Free adversarial training (Shafahi et al. 2019, arXiv:1904.12843, "Adversarial training for free!").

    The training loop replays each minibatch m times (`method.replays`); every replay is one forward and
    one backward that yields the weight gradient (the optimizer steps on it) and, for free, the gradient
    w.r.t. the perturbation, which takes one signed step of `step_size(eps)` before the next replay. The
    perturbation persists across replays and across minibatches (`perturbation["delta"]`, zeros at the
    start of a run), so after the m-th replay the next batch starts from the last one's perturbation.
    With `run.epochs` = N / m the run costs about N clean epochs.

    The perturbation's step is applied at the start of the next call, once the loop's backward has
    filled in its gradient; the forward is the model's own (train mode, DDP-synchronised), so
    `attack_mode` does not apply.
    """
    pending = perturbation.get("pending")
    delta = perturbation.get("delta")
    if pending is not None and pending.grad is not None:
        with torch.no_grad():
            grad = pending.grad
            if attack.norm == "linf":
                stepped = pending + perturbation["step"] * grad.sign()
                stepped = stepped.clamp(-eps, eps)
            else:
                stepped = pending + perturbation["step"] * grad / _per_example_norm(grad)
                stepped = stepped * (eps / _per_example_norm(stepped)).clamp(max=1.0)
            delta[: len(stepped)] = stepped
    if delta is None or delta.shape[1:] != x.shape[1:] or len(delta) < len(x):
        delta = torch.zeros_like(x)
    elif attack.norm == "linf":
        delta = delta.clamp(-eps, eps)  # eps may have changed (ramp); keep the buffer inside the ball
    perturbation["delta"] = delta
    perturbation["step"] = step_size(
        eps, num_steps=attack.num_steps, factor=attack.step_size_factor, absolute=attack.step_size
    )
    current = delta[: len(x)].clone().requires_grad_(True)
    perturbation["pending"] = current
    logits = model((x + current).clamp(0, 1))
    return F.cross_entropy(logits, y), logits


Method = Callable[..., MethodResult]


@dataclass(frozen=True)
class MethodSpec:
    """One training objective and what the rest of the pipeline needs to know about it, so that nothing
    outside this module branches on a method's name.

    - `fn`: the objective, `fn(model, attack_model, x, y, *, attack, eps, attack_mode, generator, ...)`.
    - `adversarial`: trains on attacked inputs (needs attack.eps > 0; the collapse guard applies).
    - `single_step`: one attack step per minibatch, the methods prone to catastrophic overfitting (Wong
      et al. 2020); after a collapse they switch to pgd_at, multi-step ones keep their objective.
    - `replays`: steps the optimizer `method.replays` times on each minibatch (free_at); 1 otherwise.
    - `settings`: the MethodConfig fields bound into `fn` (`beta`).
    - `weight_perturbation`: takes AWP's `perturb_weights` hook.
    - `persistent_perturbation`: keeps a perturbation across minibatches (free_at), fresh per build.
    - `attack`: the training attack it must use, if any (fgsm_rs generates with fgsm).
    """

    fn: Method
    adversarial: bool = True
    single_step: bool = False
    replays: bool = False
    settings: tuple[str, ...] = ()
    weight_perturbation: bool = True
    persistent_perturbation: bool = False
    attack: str | None = None


METHODS: dict[str, MethodSpec] = {
    "standard": MethodSpec(standard, adversarial=False),
    "pgd_at": MethodSpec(pgd_at),
    "fgsm_rs": MethodSpec(fgsm_rs, single_step=True, attack="fgsm"),
    "free_at": MethodSpec(
        free_at, single_step=True, replays=True, weight_perturbation=False, persistent_perturbation=True
    ),
    "trades": MethodSpec(trades, settings=("beta",)),
    "mart": MethodSpec(mart, settings=("beta",)),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; allowed: {', '.join(METHODS)}") from None


def get_method(name: str, settings: MethodConfig | None = None) -> Method:
    """The method by name with its settings bound from `settings` (MethodConfig defaults when None) and,
    for free_at, a fresh persistent perturbation, so each call gives an independent training run its own
    state. A setting's value comes from the config whatever `settings.name` is: a collapse fallback
    builds pgd_at from the run's MethodConfig."""
    spec = method_spec(name)
    settings = settings or MethodConfig()
    bound: dict[str, object] = {key: getattr(settings, key) for key in spec.settings}
    if spec.persistent_perturbation:
        bound["perturbation"] = {}
    return partial(spec.fn, **bound) if bound else spec.fn


def replays(method_name: str, configured: int) -> int:
    """Optimizer steps per minibatch: `configured` (m) for a replaying method, 1 for every other."""
    return configured if method_spec(method_name).replays else 1
