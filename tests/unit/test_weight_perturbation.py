"""Adversarial weight perturbation (Wu et al. 2020): the perturbation's size and direction, its undoing,
its place in the training step, its config, and DDP replicas staying identical under it (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.config import AttackConfig, Config, MethodConfig, ModelConfig, load_config
from pipeline.methods import METHODS, get_method
from pipeline.models import architecture, build_model
from pipeline.training.perturbation import perturb_weights, restore_weights, weight_perturbation_gamma
from pipeline.training.plan import EpochPlan
from pipeline.training.steps import make_optimizer, train_epoch

ROOT = Path(__file__).resolve().parents[2]


def _model():
    torch.manual_seed(0)
    return build_model(architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,)))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_each_weight_moves_uphill_by_gamma_times_its_norm_and_back(batch):
    x, y = batch
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = float(F.cross_entropy(model(x), y))

    shifts = perturb_weights(model, lambda: F.cross_entropy(model(x), y), gamma=0.05)

    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {name for name, p in model.named_parameters() if p.dim() > 1}, "conv/linear weights only"
    assert len(shifts) == len(moved)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            step = float((p.detach() - before[name]).norm())
            assert step == pytest.approx(0.05 * float(before[name].norm()), rel=1e-4), name
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) > loss_before, "the perturbation climbs the loss"
    restore_weights(shifts)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name}: restored to the bit"


def test_batchnorm_statistics_and_scales_are_left_alone(batch):
    x, y = batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    model.train()
    buffers = [b.clone() for b in model.buffers()]
    bn_scale = model[1].weight.detach().clone()
    perturb_weights(model, lambda: F.cross_entropy(model(x), y), gamma=0.01)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True)), "running stats put back"
    assert torch.equal(model[1].weight, bn_scale)


@pytest.mark.parametrize("name", [name for name in METHODS if name != "free_at"])
def test_every_method_hands_its_own_loss_to_the_perturbation(name, batch):
    x, y = batch
    model = _model()
    single_step = name == "fgsm_rs"
    attack = AttackConfig(name="fgsm" if single_step else "pgd", eps=0.2, num_steps=1 if single_step else 3)
    seen = []

    def record(loss_fn):
        loss = loss_fn()
        seen.append(float(loss.detach()))
        assert loss.requires_grad

    plain, _ = get_method(name)(
        model, model, x, y, attack=attack, eps=0.2, attack_mode="eval", generator=torch.Generator().manual_seed(1)
    )
    with_hook, _ = get_method(name)(
        model,
        model,
        x,
        y,
        attack=attack,
        eps=0.2,
        attack_mode="eval",
        generator=torch.Generator().manual_seed(1),
        perturb_weights=record,
    )
    # The hook saw the very loss the method trains on (same examples; here it moved nothing).
    assert seen == [pytest.approx(float(plain))] and float(with_hook) == pytest.approx(float(plain))


def _one_step(batch, *, awp_gamma, lr, precision="none"):
    model = _model()
    optimizer = make_optimizer(model, Config().optim.model_copy(update={"name": "sgd", "lr": lr, "momentum": 0.0}))
    stats = train_epoch(
        model,
        model,
        [batch],
        EpochPlan(
            "pgd_at",
            get_method("pgd_at"),
            attack=AttackConfig(eps=0.2, num_steps=2),
            eps_for_step=lambda step: 0.2,
            attack_mode="eval",
            awp_gamma=awp_gamma,
        ),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(3),
        precision=precision,
    )
    return model, stats


# bf16: autocast caches the bf16 copies of the weights for its whole region, blind to in-place changes;
# without clearing that cache the loss would be the unperturbed one.
@pytest.mark.parametrize("precision", ["none", "bf16"])
def test_train_epoch_takes_the_gradient_at_the_perturbed_weights_and_steps_from_the_unperturbed_ones(batch, precision):
    initial = _model()
    # No optimizer step: the weights come back exactly, and the loss was taken uphill of them.
    _, plain = _one_step(batch, awp_gamma=0.0, lr=0.0, precision=precision)
    perturbed, awp = _one_step(batch, awp_gamma=0.05, lr=0.0, precision=precision)
    for a, b in zip(initial.parameters(), perturbed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert awp["loss_sum"] > plain["loss_sum"]
    # With a step, it is the gradient at the perturbed point: a different update from plain PGD-AT's.
    stepped_plain, _ = _one_step(batch, awp_gamma=0.0, lr=0.1, precision=precision)
    stepped_awp, _ = _one_step(batch, awp_gamma=0.05, lr=0.1, precision=precision)
    updates = [
        (float((p - i).norm()), float((q - p).norm()))
        for i, p, q in zip(initial.parameters(), stepped_plain.parameters(), stepped_awp.parameters(), strict=True)
    ]
    assert all(plain_update > 0 for plain_update, _ in updates)
    assert any(difference > 1e-4 * plain_update for plain_update, difference in updates)


def test_config_and_warmup():
    assert MethodConfig().awp_gamma == 0.0, "off unless asked for"
    method = MethodConfig(name="mart", awp_gamma=0.005, awp_warmup_epochs=2)
    assert [weight_perturbation_gamma(method, epoch) for epoch in (1, 2, 3, 12)] == [0.0, 0.0, 0.005, 0.005]
    with pytest.raises(ValueError, match="not free_at"):
        Config(
            method=MethodConfig(name="free_at", awp_gamma=0.01),
            attack=AttackConfig(name="fgsm", num_steps=1, eps=0.1),
        )
    with pytest.raises(ValueError, match="awp_gamma"):
        load_config(ROOT / "jobs/configs/fashion_mnist_mart_wide.toml", overrides=["method.awp_gamma=-0.01"])


def _ddp_rank(rank: int, world_size: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_model())
        optimizer = make_optimizer(model, Config().optim.model_copy(update={"name": "sgd", "lr": 0.1}))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        # Many steps: a restore that is off by one rounding error per step would show as drift.
        batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(25)]
        train_epoch(
            model,
            model.module,
            batches,
            EpochPlan(
                "trades",
                get_method("trades"),
                attack=AttackConfig(eps=0.2, num_steps=2),
                eps_for_step=lambda step: 0.2,
                attack_mode="eval",
                awp_gamma=0.05,
            ),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            device=torch.device("cpu"),
            generator=g,
        )
        results[rank] = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_stay_identical_although_each_rank_perturbs_along_its_own_shard(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    initial = torch.cat([p.detach().flatten() for p in _model().parameters()])
    assert not torch.equal(results[0], initial), "trained"
    assert torch.equal(results[0], results[1]), "replicas identical to the bit after 25 AWP steps"
