"""Training objectives: contracts on a tiny model (no Ray)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AttackConfig, ModelConfig
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
    trades_loss, _ = get_method("trades", beta=0.0)(model, model, x, y, attack=attack, eps=0.2, attack_mode="eval")
    assert torch.equal(standard_loss, trades_loss)


def test_trades_adds_a_positive_kl_term(batch):
    x, y = batch
    model = _model()
    attack = AttackConfig(eps=0.2, num_steps=3)
    loss, logits_adv = get_method("trades", beta=6.0)(
        model, model, x, y, attack=attack, eps=0.2, attack_mode="eval", generator=torch.Generator().manual_seed(1)
    )
    clean = F.cross_entropy(model(x), y)
    assert loss > clean and logits_adv.shape == (16, 10)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_without_touching_modes_wrongly(name, batch):
    x, y = batch
    model = _model()
    attack = AttackConfig(name="fgsm" if name == "fgsm_rs" else "pgd", eps=0.2, num_steps=1 if name == "fgsm_rs" else 3)
    model.train()
    loss, logits = get_method(name)(model, model, x, y, attack=attack, eps=0.2, attack_mode="eval")
    assert model.training, "methods hand the model back in train mode"
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    assert all(p.grad is None for p in model.parameters()), "attack generation must not leave parameter grads"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: standard, pgd_at, fgsm_rs, trades, mart"):
        get_method("free")
