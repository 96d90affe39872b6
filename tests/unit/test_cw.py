"""Carlini & Wagner L2: the attack contract, minimal-norm semantics, the binary search over c, confidence."""

import math

import pytest
import torch
from torch import nn

from pipeline.attacks.cw import cw_l2
from pipeline.config import ModelConfig
from pipeline.data import load_split
from pipeline.models import architecture, build_model


@pytest.fixture(scope="module")
def batch(digits_path):
    x, y = load_split(digits_path, "val")
    return x[:32], y[:32]


def _linear(seed=0):
    """Two classes, a linear model on 64 pixels, inputs near 0.5 and boundary distances ~0.5 (L2), so
    the box never binds: the minimal L2 perturbation is |w.x + b| / ||w|| (w, b: logit differences)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = 0.5 + 0.05 * torch.randn(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        model[1].weight.copy_(0.1 * torch.randn(2, 64, generator=g))
        w = model[1].weight[1] - model[1].weight[0]
        model[1].bias.copy_(torch.tensor([0.0, float(-0.5 * w.sum() + 0.5 * w.norm())]))
        value = x.flatten(1) @ w + model[1].bias[1]
        y = model(x).argmax(1)
    return model, x, y, value.abs() / w.norm()


def _margin(model, x_adv, y):
    """max_{i != y} z_i - z_y (positive = misclassified)."""
    with torch.no_grad():
        logits = model(x_adv)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - logits.gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stays_in_ball_and_box_without_touching_the_model(mode, batch):
    arch = architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,))
    torch.manual_seed(0)
    model = build_model(arch).train(mode == "train")
    x, y = batch[0][:8], batch[1][:8]
    with torch.no_grad():  # the attack takes its gradients even when the caller is under no_grad
        x_adv = cw_l2(model, x, y, eps=1.0, num_steps=5, binary_search_steps=2, initial_const=1.0)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == (mode == "train") for m in model.modules())


def test_breaks_the_undefended_model_within_eps(batch, undefended):
    x, y = batch
    x_adv = cw_l2(undefended, x, y, eps=1.0, num_steps=100, binary_search_steps=4, initial_const=0.1)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    with torch.no_grad():
        clean = (undefended(x).argmax(1) == y).float().mean()
        robust = (undefended(x_adv).argmax(1) == y).float().mean()
    assert robust < clean - 0.5, f"clean {clean:.3f}, robust {robust:.3f}"


def test_unbounded_answers_are_adversarial_or_x(batch, undefended):
    x, y = batch
    y = y.clone()
    y[0] = (undefended(x[:1]).argmax(1)[0] + 1) % 10  # already misclassified: must come back as x
    x_adv = cw_l2(undefended, x, y, eps=math.inf, num_steps=50, binary_search_steps=3, initial_const=0.1)
    changed = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        wrong = undefended(x_adv).argmax(1) != y
    assert torch.equal(x_adv[0], x[0])
    assert changed.sum() >= 16 and wrong[changed].all()


def test_minimal_norm_on_a_linear_model_is_the_analytic_distance():
    model, x, y, distance = _linear()
    x_adv = cw_l2(model, x, y, eps=math.inf, num_steps=300, binary_search_steps=6)
    found = (x_adv - x).flatten(1).norm(dim=1)
    assert (_margin(model, x_adv, y) > 0).all()
    assert torch.allclose(found, distance, rtol=0.05), (found / distance).tolist()


def test_the_binary_search_finds_what_the_initial_constant_misses():
    model, x, y, _ = _linear()
    # c = 1e-3 weighs the margin too little on this model: one search step finds nothing.
    alone = cw_l2(model, x, y, eps=math.inf, num_steps=100, binary_search_steps=1)
    searched = cw_l2(model, x, y, eps=math.inf, num_steps=100, binary_search_steps=5)
    assert torch.equal(alone, x)
    assert (_margin(model, searched, y) > 0).all()


def test_confidence_buys_larger_margins():
    model, x, y, _ = _linear()
    plain = cw_l2(model, x, y, eps=math.inf, num_steps=200, binary_search_steps=6)
    confident = cw_l2(model, x, y, eps=math.inf, num_steps=200, binary_search_steps=6, confidence=0.5)
    assert (_margin(model, confident, y) >= 0.5).all()
    assert (_margin(model, confident, y) > _margin(model, plain, y) + 0.4).all()
    assert ((confident - x).flatten(1).norm(dim=1) > (plain - x).flatten(1).norm(dim=1)).all()


def test_early_abort_stops_a_stalled_search():
    model, x, y, _ = _linear()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    # Converged long before 400 steps a search step: aborting early gives the same answer, sooner.
    full = cw_l2(model, x, y, eps=math.inf, num_steps=400, binary_search_steps=5, abort_early=False)
    full_calls = len(calls)
    early = cw_l2(model, x, y, eps=math.inf, num_steps=400, binary_search_steps=5)
    norms = [(a - x).flatten(1).norm(dim=1) for a in (full, early)]
    assert torch.allclose(norms[0], norms[1], rtol=0.02)
    assert len(calls) - full_calls < full_calls / 2


def test_reproducible(batch, undefended):
    x, y = batch[0][:8], batch[1][:8]
    runs = [cw_l2(undefended, x, y, eps=math.inf, num_steps=10, binary_search_steps=2) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "linf"}, "supports norm l2"),
        ({"eps": -1.0}, "eps >= 0"),
        ({"num_steps": 0}, "num_steps >= 1"),
        ({"binary_search_steps": 0}, "binary_search_steps >= 1"),
        ({"initial_const": 0.0}, "initial_const > 0"),
        ({"learning_rate": -0.1}, "learning_rate > 0"),
        ({"confidence": -1.0}, "confidence >= 0"),
    ],
)
def test_refuses_bad_options(options, message, batch, undefended):
    x, y = batch
    with pytest.raises(ValueError, match=message):
        cw_l2(undefended, x[:2], y[:2], **{"eps": 1.0, **options})


def test_zero_eps_returns_x(batch, undefended):
    x, y = batch
    assert torch.equal(cw_l2(undefended, x, y, eps=0.0), x)
