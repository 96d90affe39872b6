"""Training objectives: contracts on a tiny model (no Ray)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AttackConfig, MethodConfig, ModelConfig
from pipeline.methods import METHODS, get_method
from pipeline.models import architecture, build_model


def _model():
    torch.manual_seed(0)
    return build_model(architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,)))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_trades_with_beta_zero_is_standard_training(batch):
    x, y = batch
    model = _model()
    attack = AttackConfig(eps=0.2, num_steps=3)
    standard_loss, _ = get_method("standard")(model, model, x, y, attack=attack, eps=0.2, attack_mode="eval")
    trades_loss, _ = get_method("trades", MethodConfig(beta=0.0))(
        model, model, x, y, attack=attack, eps=0.2, attack_mode="eval"
    )
    assert torch.equal(standard_loss, trades_loss)


def test_trades_adds_a_positive_kl_term(batch):
    x, y = batch
    model = _model()
    attack = AttackConfig(eps=0.2, num_steps=3)
    loss, logits_adv = get_method("trades", MethodConfig(beta=6.0))(
        model, model, x, y, attack=attack, eps=0.2, attack_mode="eval", generator=torch.Generator().manual_seed(1)
    )
    clean = F.cross_entropy(model(x), y)
    assert loss > clean and logits_adv.shape == (16, 10)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_without_touching_modes_wrongly(name, batch):
    x, y = batch
    model = _model()
    single_step = name in ("fgsm_rs", "free_at")
    attack = AttackConfig(name="fgsm" if single_step else "pgd", eps=0.2, num_steps=1 if single_step else 3)
    model.train()
    loss, logits = get_method(name)(model, model, x, y, attack=attack, eps=0.2, attack_mode="eval")
    assert model.training, "methods hand the model back in train mode"
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    assert all(p.grad is None for p in model.parameters()), "attack generation must not leave parameter grads"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: standard, pgd_at, fgsm_rs, free_at, trades, mart"):
        get_method("free")


def _replay(method, model, x, y, attack, eps=0.2):
    loss, _ = method(model, model, x, y, attack=attack, eps=eps, attack_mode="eval")
    model.zero_grad()
    loss.backward()
    return loss


def test_free_at_perturbation_persists_across_replays_and_batches(batch):
    """Shafahi et al.: each replay's backward also yields the input gradient; the perturbation takes one
    signed step of eps (clipped to the ball) before the next replay and carries over to the next batch."""
    x, y = batch
    model = _model()
    attack = AttackConfig(name="fgsm", eps=0.2, num_steps=1, step_size_factor=0.5)  # step 0.1 = eps / 2
    method = get_method("free_at")
    state = method.keywords["perturbation"]
    _replay(method, model, x, y, attack)
    first = state["pending"]
    assert torch.equal(first.detach(), torch.zeros_like(x)), "a run starts from zero perturbation"
    grad = first.grad.clone()
    _replay(method, model, x, y, attack)
    second = state["pending"].detach()
    assert torch.allclose(second, (0.1 * grad.sign()).clamp(-0.2, 0.2))
    grad2 = state["pending"].grad.clone()
    _replay(method, model, x, y, attack)
    third = state["pending"].detach()
    assert torch.allclose(third, (second + 0.1 * grad2.sign()).clamp(-0.2, 0.2))
    assert third.abs().max() <= 0.2 + 1e-7 and (third.abs() == 0.2).any(), "clipped to the eps-ball"
    # A new minibatch (here: half as large) starts from where the last replay left the perturbation.
    grad3 = state["pending"].grad.clone()
    _replay(method, model, x[:8], y[:8], attack)
    assert torch.allclose(state["pending"].detach(), (third + 0.1 * grad3.sign()).clamp(-0.2, 0.2)[:8])
    # Independent runs get independent state.
    assert get_method("free_at").keywords["perturbation"] == {}


def test_free_at_replays_each_minibatch_m_times():
    from pipeline.config import Config
    from pipeline.training.plan import EpochPlan
    from pipeline.training.steps import make_optimizer, train_epoch

    model = _model()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    optimizer = make_optimizer(model, Config().optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = train_epoch(
        model,
        model,
        batches,
        EpochPlan(
            "free_at",
            get_method("free_at"),
            attack=AttackConfig(name="fgsm", eps=0.1, num_steps=1, step_size_factor=1.0),
            eps_for_step=lambda step: 0.1,
            attack_mode="eval",
            replays=4,
        ),
        optimizer=optimizer,
        scheduler=scheduler,
        device=torch.device("cpu"),
    )
    assert scheduler.last_epoch == 12 and stats["count"] == 3 * 8 * 4


def test_bf16_autocast_trains_with_fp32_weights(batch):
    from pipeline.config import Config
    from pipeline.training.plan import EpochPlan
    from pipeline.training.steps import make_optimizer, train_epoch

    x, y = batch
    model = _model()
    optimizer = make_optimizer(model, Config().optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(
        model,
        model,
        [(x, y)],
        EpochPlan(
            "pgd_at",
            get_method("pgd_at"),
            attack=AttackConfig(eps=0.2, num_steps=2),
            eps_for_step=lambda step: 0.2,
            attack_mode="eval",
        ),
        optimizer=optimizer,
        scheduler=scheduler,
        device=torch.device("cpu"),
        precision="bf16",
    )
    assert stats["loss_sum"] > 0 and all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # Outside the training step nothing is left in bf16: evaluation runs in fp32.
    assert model(x).dtype == torch.float32


def test_auto_precision_is_bf16_only_where_bf16_is_native():
    from pipeline.training.steps import training_precision

    assert training_precision("auto", bf16_native=True) == "bf16"
    assert training_precision("auto", bf16_native=False) == "none"
    # Explicit settings are taken as given, emulated bf16 included (the caller warns).
    assert training_precision("bf16", bf16_native=False) == "bf16"
    assert training_precision("none", bf16_native=True) == "none"
    with pytest.raises(ValueError, match="allowed: none, bf16, auto"):
        training_precision("fp16", bf16_native=True)


def test_bf16_is_native_on_this_cpu_exactly_when_the_kernel_reports_bf16_hardware():
    from pipeline.training.steps import bf16_is_native

    # The kernel's view of the CPU, independent of torch's cpuinfo probes.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert bf16_is_native(torch.device("cpu")) == bool({"avx512_bf16", "amx_bf16"} & flags), sorted(
        f for f in flags if "avx512" in f or "amx" in f
    )
    assert not bf16_is_native(torch.device("meta"))


def test_train_epoch_refuses_an_unresolved_precision(batch):
    from pipeline.config import Config
    from pipeline.training.plan import EpochPlan
    from pipeline.training.steps import make_optimizer, train_epoch

    model = _model()
    optimizer = make_optimizer(model, Config().optim)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        train_epoch(
            model,
            model,
            [batch],
            EpochPlan(
                "pgd_at",
                get_method("pgd_at"),
                attack=AttackConfig(eps=0.2, num_steps=2),
                eps_for_step=lambda step: 0.2,
                attack_mode="eval",
            ),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            device=torch.device("cpu"),
            precision="auto",
        )


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_bf16_loss_matches_fp32_when_a_wrong_class_is_confident(name):
    # A model sure of a wrong class (logit 20 for class 3, labels 0-2): in bf16 the probability of
    # class 3 rounds to 1, and a loss with log(1 - p) computed in bf16 would jump from -log(1e-4) to
    # -log(1e-12) (MART did this before its loss was cast to fp32: a 1.6x loss and exploding gradients).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.mul_(0.01)
        model[1].bias.zero_()
        model[1].bias[3] = 20.0
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    method, attack = get_method(name), AttackConfig(eps=0.1, num_steps=2)
    fp32_loss, _ = method(model, model, x, y, attack=attack, eps=0.1, attack_mode="eval")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, _ = method(model, model, x, y, attack=attack, eps=0.1, attack_mode="eval")
    assert bf16_loss.dtype == torch.float32
    assert abs(bf16_loss.item() - fp32_loss.item()) <= 0.01 * fp32_loss.item()


def test_catastrophic_overfitting_rule_and_fallback():
    from pipeline.training.guard import collapsed, fallback_attack, fallback_training

    assert collapsed(0.05, 0.60, drop=0.2) and not collapsed(0.45, 0.60, drop=0.2)
    assert not collapsed(0.0, 0.1, drop=0.2), "no collapse below a robust accuracy never reached"
    safer = fallback_attack(AttackConfig(name="fgsm", eps=0.1, num_steps=1, step_size_factor=1.25), num_steps=2)
    assert (safer.name, safer.num_steps, safer.step_size_factor, safer.random_start) == ("pgd", 2, 2.5, True)
    assert safer.eps == 0.1
    # Single-step methods switch to pgd_at; a multi-step method keeps its objective, with twice the steps
    # and the smaller 2.5 * eps / steps step.
    fgsm = AttackConfig(name="fgsm", eps=0.1, num_steps=1, step_size_factor=1.25)
    name, after = fallback_training("fgsm_rs", fgsm, min_steps=2)
    assert (name, after.name, after.num_steps) == ("pgd_at", "pgd", 2)
    pgd3 = AttackConfig(name="pgd", eps=0.1, num_steps=3, step_size_factor=3.0, random_start=False)
    name, after = fallback_training("mart", pgd3, min_steps=2)
    assert (name, after.num_steps, after.step_size_factor, after.random_start) == ("mart", 6, 2.5, True)
    assert fallback_training("trades", pgd3, min_steps=8)[1].num_steps == 8


def test_deepfool_trains_a_model_more_robust_than_standard_training(digits_path, undefended):
    """DeepFool as the training attack (`attack.name = "deepfool"`, clipped to the eps-ball): the seed's
    "efficient alternative for generating training examples". It must beat standard training under PGD."""
    from conftest import train_in_process

    from pipeline.attacks import pgd
    from pipeline.data import load_split

    model, _ = train_in_process(digits_path, method="pgd_at", epochs=6, attack={"name": "deepfool", "num_steps": 5})
    x, y = load_split(digits_path, "test", max_examples=300)
    accuracy = {}
    for name, net in (("deepfool_at", model), ("standard", undefended)):
        x_adv = pgd(net, x, y, eps=0.1, step_size=0.025, num_steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            accuracy[name] = (
                float((net(x).argmax(1) == y).float().mean()),
                float((net(x_adv).argmax(1) == y).float().mean()),
            )
    assert accuracy["deepfool_at"][0] > 0.85, accuracy
    assert accuracy["deepfool_at"][1] > accuracy["standard"][1] + 0.1, accuracy
