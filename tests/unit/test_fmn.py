"""Fast Minimum-Norm (L2, Linf): the attack contract, minimal-norm semantics, schedules, warm starts."""

import math

import pytest
import torch
from torch import nn

from pipeline.attacks.fmn import fmn
from pipeline.config import ModelConfig
from pipeline.data import load_split
from pipeline.models import architecture, build_model


@pytest.fixture(scope="module")
def batch(digits_path):
    x, y = load_split(digits_path, "val")
    return x[:32], y[:32]


def _linear(seed=0):
    """Two classes, a linear model on 64 pixels, inputs near 0.5 and boundary distances ~0.5 (L2), so
    the box never binds: the minimal perturbation is |w.x + b| / ||w||_dual (L2: ||w||_2, Linf: ||w||_1)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = 0.5 + 0.05 * torch.randn(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        model[1].weight.copy_(0.1 * torch.randn(2, 64, generator=g))
        w = model[1].weight[1] - model[1].weight[0]
        model[1].bias.copy_(torch.tensor([0.0, float(-0.5 * w.sum() + 0.5 * w.norm())]))
        value = (x.flatten(1) @ w + model[1].bias[1]).abs()
        y = model(x).argmax(1)
    return model, x, y, {"l2": value / w.norm(), "linf": value / w.norm(p=1)}


def _norms(x_adv, x, norm):
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.0)])
def test_stays_in_ball_and_box_without_touching_the_model(mode, norm, eps, batch):
    arch = architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,))
    torch.manual_seed(0)
    model = build_model(arch).train(mode == "train")
    x, y = batch[0][:8], batch[1][:8]
    with torch.no_grad():  # the attack takes its gradients even when the caller is under no_grad
        x_adv = fmn(model, x, y, eps=eps, norm=norm, num_steps=5)
    assert _norms(x_adv, x, norm).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == (mode == "train") for m in model.modules())


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.0)])
def test_breaks_the_undefended_model_within_eps(norm, eps, batch, undefended):
    x, y = batch
    x_adv = fmn(undefended, x, y, eps=eps, norm=norm, num_steps=20)
    assert _norms(x_adv, x, norm).max() <= eps + 1e-5
    with torch.no_grad():
        clean = (undefended(x).argmax(1) == y).float().mean()
        robust = (undefended(x_adv).argmax(1) == y).float().mean()
    assert robust < clean - 0.5, f"clean {clean:.3f}, robust {robust:.3f}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unbounded_answers_are_adversarial_or_x(norm, batch, undefended):
    x, y = batch
    y = y.clone()
    y[0] = (undefended(x[:1]).argmax(1)[0] + 1) % 10  # already misclassified: must come back as x
    x_adv = fmn(undefended, x, y, eps=math.inf, norm=norm, num_steps=30)
    changed = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        wrong = undefended(x_adv).argmax(1) != y
    assert torch.equal(x_adv[0], x[0])
    assert changed.sum() >= 16 and wrong[changed].all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_norm_on_a_linear_model_is_the_analytic_distance(norm):
    model, x, y, distance = _linear()
    x_adv = fmn(model, x, y, eps=math.inf, norm=norm, num_steps=100)
    found = _norms(x_adv, x, norm)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    assert torch.allclose(found, distance[norm], rtol=0.05), (found / distance[norm]).tolist()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_warm_start_from_far_adversarials(norm):
    model, x, y, distance = _linear()
    w = model[1].weight[1] - model[1].weight[0]
    towards = torch.where(y == 0, 1.0, -1.0)[:, None] * (w / w.norm())  # unit normals across the boundary
    far = (x.flatten(1) + (3 * distance["l2"])[:, None] * towards).view_as(x).clamp(0, 1)
    with torch.no_grad():
        assert (model(far).argmax(1) != y).all()
    x_adv = fmn(model, x, y, eps=math.inf, norm=norm, num_steps=20, starting_points=far)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    assert torch.allclose(_norms(x_adv, x, norm), distance[norm], rtol=0.05)
    # A starting point that is not adversarial is ignored: that example starts from x.
    x_same = fmn(model, x, y, eps=math.inf, norm=norm, num_steps=20, starting_points=x.clone())
    assert torch.equal(x_same, fmn(model, x, y, eps=math.inf, norm=norm, num_steps=20))


def test_box_aware_steps_reach_the_boundary_where_the_reference_rule_stalls(batch, undefended):
    """Many digit pixels sit at 0 or 1: the authors' eps rule, fed the full gradient, stalls short of
    the boundary for some examples; dropping the components the box blocks gets there."""
    x, y = batch
    found = {}
    for box_aware in (False, True):
        x_adv = fmn(undefended, x, y, eps=math.inf, norm="l2", num_steps=30, box_aware=box_aware)
        with torch.no_grad():
            found[box_aware] = int((undefended(x_adv).argmax(1) != y).sum())
    assert found[True] == len(y) > found[False]


def test_reproducible(batch, undefended):
    x, y = batch
    runs = [fmn(undefended, x, y, eps=math.inf, norm="l2", num_steps=20) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "l1"}, "supports norm linf or l2"),
        ({"eps": -1.0}, "eps >= 0"),
        ({"num_steps": 0}, "num_steps >= 1"),
        ({"binary_search_steps": -1}, "binary_search_steps >= 0"),
        ({"alpha_init": 0.0}, "alpha_init > 0"),
        ({"alpha_final": -1.0}, "alpha_final >= 0"),
        ({"gamma_init": 1.0}, r"gamma_init and gamma_final in \[0, 1\)"),
        ({"gamma_final": -0.1}, r"gamma_init and gamma_final in \[0, 1\)"),
        ({"starting_points": torch.zeros(3, 1, 8, 8)}, "starting_points must have the shape of x"),
    ],
)
def test_refuses_bad_options(options, message, batch, undefended):
    x, y = batch
    with pytest.raises(ValueError, match=message):
        fmn(undefended, x[:2], y[:2], **{"eps": 1.0, **options})


def test_zero_eps_returns_x(batch, undefended):
    x, y = batch
    assert torch.equal(fmn(undefended, x, y, eps=0.0), x)
