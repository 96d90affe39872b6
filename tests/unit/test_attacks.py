"""Attack contracts: eps-ball, [0,1], loss goes up, no parameter gradients, mode unchanged, strength."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import ATTACKS, fgsm, get_attack, pgd
from pipeline.config import ModelConfig
from pipeline.data import load_split
from pipeline.models import architecture, build_model
from pipeline.training.validation import clean_and_robust_correct, predict


def _tiny_model(in_channels=1, side=8):
    arch = architecture(ModelConfig(), shape=(in_channels, side, side), num_classes=10, mean=(0.3,), std=(0.4,))
    torch.manual_seed(0)
    return build_model(arch)


@pytest.fixture(scope="module")
def batch(digits_path):
    x, y = load_split(digits_path, "val")
    return x[:64], y[:64]


ATTACK_CALLS = {
    "fgsm": lambda m, x, y, eps, norm: fgsm(m, x, y, eps=eps, norm=norm),
    "pgd_cw": lambda m, x, y, eps, norm: get_attack("pgd_cw")(
        m, x, y, eps=eps, step_size=eps / 4, num_steps=10, norm=norm
    ),
    "apgd_ce": lambda m, x, y, eps, norm: get_attack("apgd_ce")(m, x, y, eps=eps, norm=norm, num_steps=20),
    "apgd_dlr": lambda m, x, y, eps, norm: get_attack("apgd_dlr")(m, x, y, eps=eps, norm=norm, num_steps=20),
    "apgd_t": lambda m, x, y, eps, norm: get_attack("apgd_t")(
        m, x, y, eps=eps, norm=norm, num_steps=20, num_target_classes=3
    ),
    "square": lambda m, x, y, eps, norm: get_attack("square")(m, x, y, eps=eps, norm=norm, num_queries=300),
    "fgsm_rs": lambda m, x, y, eps, norm: fgsm(m, x, y, eps=eps, step_size=1.25 * eps, norm=norm, random_start=True),
    "pgd": lambda m, x, y, eps, norm: pgd(m, x, y, eps=eps, step_size=eps / 4, num_steps=10, norm=norm),
    "pgd_restarts": lambda m, x, y, eps, norm: pgd(
        m, x, y, eps=eps, step_size=eps / 4, num_steps=5, norm=norm, num_restarts=3
    ),
    "mi_fgsm": lambda m, x, y, eps, norm: get_attack("mi_fgsm")(m, x, y, eps=eps, norm=norm),
    "deepfool": lambda m, x, y, eps, norm: get_attack("deepfool")(m, x, y, eps=eps, norm=norm, num_steps=20),
    "fab_t": lambda m, x, y, eps, norm: get_attack("fab_t")(
        m, x, y, eps=eps, norm=norm, num_steps=20, num_target_classes=3
    ),
    "cw_l2": lambda m, x, y, eps, norm: get_attack("cw_l2")(
        m, x, y, eps=eps, norm=norm, num_steps=30, binary_search_steps=2, initial_const=1.0
    ),
    "fmn": lambda m, x, y, eps, norm: get_attack("fmn")(m, x, y, eps=eps, norm=norm, num_steps=50),
}
L2_ONLY = {"cw_l2"}
CONTRACT_CASES = [
    (name, norm, eps)
    for name in ATTACK_CALLS
    for norm, eps in [("linf", 0.2), ("l2", 1.0)]
    if not (norm == "linf" and name in L2_ONLY)
]


@pytest.mark.parametrize(("name", "norm", "eps"), CONTRACT_CASES)
def test_stays_in_ball_and_box_and_raises_loss(name, norm, eps, batch, undefended):
    x, y = batch
    x_adv = ATTACK_CALLS[name](undefended, x, y, eps, norm)
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    with torch.no_grad():
        # Loss up (CE for gradient attacks; Square minimises the margin, so accuracy must drop).
        if name == "square":
            assert (undefended(x_adv).argmax(1) == y).float().mean() < (undefended(x).argmax(1) == y).float().mean()
        else:
            assert F.cross_entropy(undefended(x_adv), y) > F.cross_entropy(undefended(x), y)


def test_every_registered_attack_is_tested():
    assert set(ATTACKS) <= set(ATTACK_CALLS) | {"pgd"}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_parameter_gradients_and_mode_unchanged(mode, batch):
    model = _tiny_model()
    model.train(mode == "train")
    x, y = batch
    pgd(model, x, y, eps=0.1, step_size=0.05, num_steps=3, num_restarts=2)
    fgsm(model, x, y, eps=0.1)
    get_attack("apgd_ce")(model, x, y, eps=0.1, num_steps=5)
    get_attack("apgd_t")(model, x, y, eps=0.1, num_steps=5, num_target_classes=2)
    get_attack("square")(model, x, y, eps=0.1, num_queries=20)
    get_attack("mi_fgsm")(model, x, y, eps=0.1, num_steps=3)
    get_attack("deepfool")(model, x, y, eps=math.inf, num_steps=3)
    get_attack("fab_t")(model, x, y, eps=0.1, num_steps=3, num_target_classes=2)
    get_attack("cw_l2")(model, x, y, eps=math.inf, norm="l2", num_steps=5, binary_search_steps=2)
    get_attack("fmn")(model, x, y, eps=math.inf, num_steps=5)
    assert all(p.grad is None for p in model.parameters())
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())


def test_pgd_breaks_undefended_model_on_digits(digits_path, undefended):
    x, y = load_split(digits_path, "test")
    clean = (predict(undefended, x, batch_size=256, device=torch.device("cpu")) == y).float().mean()
    counts = clean_and_robust_correct(
        undefended,
        x,
        y,
        eps=0.2,
        norm="linf",
        num_steps=20,
        step_size_factor=2.5,
        num_restarts=1,
        batch_size=256,
        device=torch.device("cpu"),
    )
    robust = counts["robust_correct"] / counts["count"]
    assert clean > 0.85, f"the undefended model should be accurate first (clean {clean:.3f})"
    assert robust < 0.10, f"PGD-20 at eps=0.2 left {robust:.3f} accuracy"


def test_pgd_at_least_as_strong_as_fgsm(batch, undefended):
    x, y = batch
    with torch.no_grad():
        acc_fgsm = (undefended(fgsm(undefended, x, y, eps=0.1)).argmax(1) == y).float().mean()
        acc_pgd = undefended(pgd(undefended, x, y, eps=0.1, step_size=0.025, num_steps=10)).argmax(1) == y
    assert acc_pgd.float().mean() <= acc_fgsm


def test_restarts_keep_the_strongest_iterate(batch, undefended):
    x, y = batch
    g = torch.Generator().manual_seed(0)
    single = pgd(undefended, x, y, eps=0.05, step_size=0.02, num_steps=3, generator=g)
    g = torch.Generator().manual_seed(0)
    multi = pgd(undefended, x, y, eps=0.05, step_size=0.02, num_steps=3, num_restarts=4, generator=g)
    with torch.no_grad():
        wrong_single = (undefended(single).argmax(1) != y).sum()
        wrong_multi = (undefended(multi).argmax(1) != y).sum()
    assert wrong_multi >= wrong_single


def test_generator_makes_attacks_reproducible(batch, undefended):
    x, y = batch
    a = pgd(undefended, x, y, eps=0.1, step_size=0.05, num_steps=2, generator=torch.Generator().manual_seed(3))
    b = pgd(undefended, x, y, eps=0.1, step_size=0.05, num_steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_zero_eps_returns_input(batch, undefended):
    x, y = batch
    assert torch.equal(pgd(undefended, x, y, eps=0.0, step_size=0.1, num_steps=3), x)
    with pytest.raises(ValueError, match="num_steps >= 1"):
        pgd(undefended, x, y, eps=0.1, step_size=0.1, num_steps=0)


@pytest.mark.parametrize("name", ["apgd_ce", "apgd_t", "square"])
def test_strong_attacks_break_undefended_model(name, digits_path, undefended):
    x, y = load_split(digits_path, "test", max_examples=200)
    options = {"apgd_ce": {"num_steps": 100}, "apgd_t": {"num_steps": 100, "num_target_classes": 9}}
    options["square"] = {"num_queries": 2000}
    x_adv = get_attack(name)(
        undefended, x, y, eps=0.2, norm="linf", generator=torch.Generator().manual_seed(0), **options[name]
    )
    with torch.no_grad():
        accuracy = (undefended(x_adv).argmax(1) == y).float().mean()
    assert accuracy < 0.05, f"{name} left {accuracy:.3f}"


def test_apgd_checkpoints_follow_the_paper():
    from pipeline.attacks.apgd import _checkpoints

    # p_0=0, p_1=0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) -> for 100 iterations:
    assert _checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_square_schedule_halves_p():
    from pipeline.attacks.square import p_selection

    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 600, 10000) == 0.05
    assert p_selection(0.8, 50, 100) == 0.8 / 128  # rescaled to the budget: 50/100 -> 5000/10000
    # AutoAttack's standard Square (resc_schedule=False), our default: p follows the raw query index, so a
    # 5000-query run ends at p_init / 128, not at the 10,000-query schedule's p_init / 512.
    assert p_selection(0.8, 4999, 5000, rescale=False) == 0.8 / 128
    assert p_selection(0.8, 600, 5000, rescale=False) == 0.8 / 16
    assert inspect.signature(get_attack("square")).parameters["rescale_schedule"].default is False


def test_losses():
    from pipeline.attacks.losses import cw_margin, dlr, dlr_targeted

    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(cw_margin(logits, y), torch.tensor([-2.0, 2.0]))
    # DLR: -(z_y - max_other) / (z_pi1 - z_pi3)
    assert torch.allclose(dlr(logits, y), torch.tensor([-(3 - 1) / (3 - 0), -(0 - 2) / (2 - 0)]))
    target = torch.tensor([1, 1])
    expected = torch.tensor([-(3 - 1) / (3 - 0.5 * (0 - 1)), -(0 - 2) / (2 - 0.5 * (0 - 1))])
    assert torch.allclose(dlr_targeted(logits, y, target), expected)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_refuses_a_misspelt_option(name, batch):
    """One shared signature and no catch-all **kwargs: an option an attack lacks raises, never ignored."""
    model = _tiny_model()
    x, y = batch
    with pytest.raises(TypeError, match="num_stpes"):
        get_attack(name)(model, x[:4], y[:4], eps=0.1, norm="l2" if name in L2_ONLY else "linf", num_stpes=3)


def test_fgsm_refuses_several_steps(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"attack\.num_steps = 1"):
        fgsm(_tiny_model(), x[:4], y[:4], eps=0.1, num_steps=3)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_finds_the_boundary_of_a_linear_model(norm):
    """On an affine multi-class model DeepFool's linearisation is exact: one step (plus the overshoot)
    crosses the nearest boundary, at the analytic distance min_k |f_k - f_y| / ||w_k - w_y||_dual
    (q = 2 for L2, q = 1 for Linf)."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = 0.5 + 0.01 * torch.randn(32, 1, 4, 4)  # near the middle of the box: the box does not bind
    with torch.no_grad():
        logits = linear(x)
    y = logits.argmax(1)
    w = linear[1].weight
    differences = logits - logits.gather(1, y[:, None])  # f_k - f_y, (N, K)
    dual = (w[None, :, :] - w[y][:, None, :]).norm(p=2 if norm == "l2" else 1, dim=2)
    distance = (differences.abs() / dual).masked_fill(torch.nn.functional.one_hot(y, 4).bool(), math.inf)
    nearest = distance.argmin(1, keepdim=True)
    # The paper's step adds 1e-4 to |f| (to land past the boundary), then the overshoot scales it.
    analytic = (differences.abs().gather(1, nearest) + 1e-4).squeeze(1) / dual.gather(1, nearest).squeeze(1)
    x_adv = get_attack("deepfool")(linear, x, y, eps=math.inf, norm=norm, overshoot=0.02)
    with torch.no_grad():
        assert (linear(x_adv).argmax(1) != y).all()
    size = (x_adv - x).flatten(1).norm(dim=1) if norm == "l2" else (x_adv - x).flatten(1).abs().amax(1)
    assert torch.allclose(size, analytic.detach() * 1.02, rtol=1e-3, atol=1e-6)


def test_deepfool_is_smaller_than_a_fixed_eps_attack_needs(batch, undefended):
    """DeepFool's perturbations are near-minimal: its median L2 norm on digits is well below the
    radius at which PGD breaks the same examples, and every example it returns changed class."""
    x, y = batch
    x_adv = get_attack("deepfool")(undefended, x, y, eps=math.inf, norm="l2")
    with torch.no_grad():
        correct = undefended(x).argmax(1) == y
        fooled = undefended(x_adv).argmax(1) != y
    assert fooled[correct].float().mean() > 0.95
    sizes = (x_adv - x).flatten(1).norm(dim=1)[correct & fooled]
    assert sizes.median() < 1.0 and torch.equal(x_adv[~correct], x[~correct])


def test_mi_fgsm_transfers_at_least_like_fgsm(batch, undefended):
    """Momentum makes a stronger iterative attack than one FGSM step on the model it is crafted on."""
    x, y = batch
    with torch.no_grad():
        acc_fgsm = (undefended(fgsm(undefended, x, y, eps=0.1)).argmax(1) == y).float().mean()
        acc_mi = (undefended(get_attack("mi_fgsm")(undefended, x, y, eps=0.1)).argmax(1) == y).float().mean()
    assert acc_mi <= acc_fgsm
