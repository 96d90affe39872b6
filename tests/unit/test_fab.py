"""FAB-T: the attack contract with a finite eps, minimal-norm semantics with eps=inf, exactness on a linear
model, the box-constrained hyperplane projections, reproducibility and option checks."""

import math

import pytest
import torch
from torch import nn

from pipeline.attacks.fab import _project_onto_hyperplane, fab
from pipeline.attacks.minimal import perturbation_norms
from pipeline.config import ModelConfig
from pipeline.data import load_split
from pipeline.models import architecture, build_model


@pytest.fixture(scope="module")
def batch(digits_path):
    x, y = load_split(digits_path, "val")
    return x[:32], y[:32]


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _tiny_model():
    arch = architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,))
    torch.manual_seed(0)
    return build_model(arch)


def _linear_model(num_classes: int = 4, per_class: int = 4) -> nn.Module:
    """A linear classifier on 1x4x4 inputs whose class weights have disjoint supports of equal size and
    magnitude: ||w_y - w_j|| is the same for every pair (L1 and L2), so the nearest boundary is the one
    of the second most likely class, FAB-T's first target."""
    side = num_classes * per_class
    linear = nn.Linear(side, num_classes)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0] * side)[: num_classes * side]
    with torch.no_grad():
        linear.weight.zero_()
        for j in range(num_classes):
            linear.weight[j, j * per_class : (j + 1) * per_class] = signs[j * per_class : (j + 1) * per_class]
        # Logit gaps of ~0.1 to the second class and >= 0.3 to the others, around x = 0.5.
        linear.bias.copy_(torch.tensor([0.3, 0.2, 0.0, -0.2]) - linear.weight.sum(1) * 0.5)
    return nn.Sequential(nn.Flatten(), linear).eval()


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.2), ("l2", 1.0)])
def test_finite_eps_keeps_the_contract_and_breaks_undefended_model(norm, eps, batch, undefended):
    x, y = batch
    x_adv = fab(undefended, x, y, eps=eps, norm=norm, num_steps=20, num_target_classes=3)
    assert perturbation_norms(x, x_adv, norm).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert not undefended.training
    assert all(p.grad is None for p in undefended.parameters())
    clean, robust = _accuracy(undefended, x, y), _accuracy(undefended, x_adv, y)
    assert clean > 0.85 and robust < 0.25, f"clean {clean:.3f}, after FAB-T {robust:.3f}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unbounded_returns_only_adversarials_and_keeps_misclassified_points(norm, batch, undefended):
    x, y = batch
    y = y.clone()
    y[:3] = (undefended(x[:3]).argmax(1) + 1) % 10  # wrong from the start: returned as x, never attacked
    x_adv = fab(undefended, x, y, eps=math.inf, norm=norm, num_steps=30)
    changed = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        wrong = undefended(x_adv).argmax(1) != y
    assert torch.equal(x_adv[:3], x[:3])
    assert wrong[changed].all()
    assert changed.float().mean() > 0.8  # an unbounded attack breaks nearly every point of a plain model
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_exact_on_a_linear_model(norm):
    """The minimal perturbation of a linear model is analytic: gap / ||w_y - w_t|| (dual norm: L2 for L2,
    L1 for Linf). The inputs sit near 0.5 and the distances are ~0.01-0.04, so the box never binds."""
    model = _linear_model()
    torch.manual_seed(0)
    x = 0.5 + 0.01 * torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    target = logits.topk(2, dim=1).indices[:, 1]
    w = model[1].weight
    gap = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    dual = 2 if norm == "l2" else 1
    expected = gap / (w[y] - w[target]).norm(p=dual, dim=1)
    x_adv = fab(model, x, y, eps=math.inf, norm=norm)
    found = perturbation_norms(x, x_adv, norm)
    assert (model(x_adv).argmax(1) != y).all()
    ratio = found / expected
    assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.03, ratio


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_feasible_and_no_random_feasible_step_is_shorter(norm):
    torch.manual_seed(0)
    dims = 6
    for _ in range(20):
        point = torch.rand(1, dims, dtype=torch.float64)
        w = torch.randn(1, dims, dtype=torch.float64)
        w[0, 0] = 0  # a coordinate the hyperplane ignores must not move
        b = (w * torch.rand(1, dims, dtype=torch.float64)).sum(1)  # the plane meets the box
        step = _project_onto_hyperplane(point, w, b, norm)
        z = point + step
        assert step[0, 0] == 0 and z.min() >= 0 and z.max() <= 1
        assert torch.allclose((w * z).sum(1), b, atol=1e-9)
        # Random points of the plane inside the box: move one random coordinate of a random point onto it.
        cand = torch.rand(20000, dims, dtype=torch.float64)
        j = torch.randint(1, dims, (20000,))
        rows = torch.arange(20000)
        cand[rows, j] -= ((cand * w).sum(1) - b) / w[0, j]
        cand = cand[(cand.min(1).values >= 0) & (cand.max(1).values <= 1)]
        shortest = perturbation_norms(point.expand_as(cand), cand, norm).min()
        assert perturbation_norms(point, z, norm).item() <= shortest + 1e-9


def test_projection_without_binding_box_is_the_closed_form():
    point = torch.full((1, 5), 0.5, dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
    b = (w * point).sum(1) + 0.1
    l2 = _project_onto_hyperplane(point, w, b, "l2")
    assert torch.allclose(l2, 0.1 * w / (w**2).sum())
    linf = _project_onto_hyperplane(point, w, b, "linf")
    assert torch.allclose(linf, 0.1 / w.abs().sum() * w.sign())


def test_projection_onto_an_unreachable_hyperplane_goes_to_the_nearest_corner():
    point = torch.full((1, 3), 0.5)
    w = torch.tensor([[1.0, -1.0, 0.0]])
    b = torch.tensor([5.0])  # w.z <= 1 on the box: the best is z = (1, 0, anything)
    for norm in ("linf", "l2"):
        step = _project_onto_hyperplane(point, w, b, norm)
        assert torch.allclose(point + step, torch.tensor([[1.0, 0.0, 0.5]]))


def test_reproducible_with_the_same_generator(batch, undefended):
    x, y = batch
    # eps small enough that some points survive the first run, so the random restart is used.
    options = {"eps": 0.05, "num_steps": 5, "num_restarts": 2, "num_target_classes": 2}
    a = fab(undefended, x, y, generator=torch.Generator().manual_seed(3), **options)
    b = fab(undefended, x, y, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(a, b)
    assert _accuracy(undefended, a, y) > 0  # the restart did run on survivors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "l1"}, "linf or l2"),
        ({"num_steps": 0}, "num_steps >= 1"),
        ({"num_restarts": 0}, "num_restarts >= 1"),
        ({"num_target_classes": 0}, "num_target_classes >= 1"),
        ({"eps": -0.1}, "eps >= 0"),
    ],
)
def test_refuses_bad_options(options, message, batch):
    x, y = batch
    with pytest.raises(ValueError, match=message):
        fab(_tiny_model(), x[:2], y[:2], **{"eps": 0.1, **options})


def test_three_classes_clamp_the_number_of_targets(batch):
    x, y = batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    y = y % 3
    x_adv = fab(model, x, y, eps=0.3, num_steps=20)  # 9 targets asked, 2 exist
    assert perturbation_norms(x, x_adv, "linf").max() <= 0.3 + 1e-6
    unbounded = fab(model, x, y, eps=math.inf, num_steps=20, num_target_classes=5)
    changed = (unbounded != x).flatten(1).any(1)
    with torch.no_grad():
        assert (model(unbounded[changed]).argmax(1) != y[changed]).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_unchanged_no_parameter_grads_and_works_under_no_grad(mode, batch):
    model = _tiny_model()
    model.train(mode == "train")
    x, y = batch
    with torch.no_grad():
        x_adv = fab(model, x[:8], y[:8], eps=0.1, num_steps=3, num_target_classes=2, num_restarts=2)
    assert x_adv.shape == x[:8].shape and not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == (mode == "train") for m in model.modules())


def test_zero_eps_and_empty_batch_return_the_input(batch, undefended):
    x, y = batch
    assert torch.equal(fab(undefended, x, y, eps=0.0), x)
    assert fab(undefended, x[:0], y[:0], eps=0.1).shape == (0, *x.shape[1:])
