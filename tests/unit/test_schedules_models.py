import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models import architecture, build_model
from pipeline.schedules import eps_at, eps_by_step, lr_factor, step_size


def test_linear_eps_ramp_exact_values():
    assert eps_at(0.0, eps=0.2, ramp="linear", ramp_epochs=4) == 0.0
    assert eps_at(1.0, eps=0.2, ramp="linear", ramp_epochs=4) == pytest.approx(0.05)
    assert eps_at(2.0, eps=0.2, ramp="linear", ramp_epochs=4) == pytest.approx(0.1)
    assert eps_at(4.0, eps=0.2, ramp="linear", ramp_epochs=4) == 0.2
    assert eps_at(9.0, eps=0.2, ramp="linear", ramp_epochs=4) == 0.2
    assert eps_at(0.0, eps=0.2, ramp="none", ramp_epochs=4) == 0.2
    assert eps_at(0.0, eps=0.2, ramp="linear", ramp_epochs=0) == 0.2


def test_eps_by_step_counts_epochs_from_one():
    second_epoch = eps_by_step(2, steps_per_epoch=10, eps=0.2, ramp="linear", ramp_epochs=4)
    assert second_epoch(0) == pytest.approx(0.05)  # 1.0 epochs done
    assert second_epoch(5) == pytest.approx(0.075)  # 1.5 epochs done


def test_step_size_and_lr_schedules():
    assert step_size(0.2, num_steps=10, factor=2.5) == pytest.approx(0.05)
    assert lr_factor(0, total_epochs=10, kind="cosine") == 1.0
    assert lr_factor(5, total_epochs=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(10, total_epochs=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(2, total_epochs=10, kind="onecycle") == pytest.approx(0.5)
    assert lr_factor(4, total_epochs=10, kind="onecycle") == pytest.approx(1.0)
    assert lr_factor(7, total_epochs=10, kind="onecycle") == pytest.approx(0.5)
    assert lr_factor(3, total_epochs=10, kind="constant") == 1.0
    with pytest.raises(ValueError, match="allowed: constant, cosine, onecycle"):
        lr_factor(1, total_epochs=10, kind="step")
    assert math.isclose(lr_factor(20, total_epochs=10, kind="cosine"), 0.0, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("small_cnn", (1, 8, 8)),
        ("small_cnn", (1, 28, 28)),
        ("preact_resnet18", (3, 32, 32)),
        ("wide_resnet", (3, 32, 32)),
    ],
)
def test_models_build_by_name_and_normalise_first(name, shape):
    c = shape[0]
    arch = architecture(
        ModelConfig(name=name, width=1, depth=10), shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c
    )
    model = build_model(arch).eval()
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert type(model[0]).__name__ == "Normalize"
    assert torch.allclose(model[0](torch.full((1, *shape), 0.5)), torch.zeros(1, *shape))


@pytest.mark.parametrize(("name", "shape"), [("small_cnn", (1, 28, 28)), ("preact_resnet18", (3, 32, 32))])
def test_models_are_channels_last_with_the_same_outputs_and_gradients(name, shape):
    c = shape[0]
    arch = architecture(ModelConfig(name=name, depth=10), shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    reference = build_model(arch).eval().to(memory_format=torch.contiguous_format)
    reference.load_state_dict(model.state_dict())
    x = torch.rand(4, *shape)
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fast, out_ref = model(x_fast), reference(x_ref)
    assert torch.allclose(out_fast, out_ref, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(out_fast[:, 0].sum(), x_fast)
    (grad_ref,) = torch.autograd.grad(out_ref[:, 0].sum(), x_ref)
    assert torch.allclose(grad_fast, grad_ref, atol=1e-5)


@pytest.mark.parametrize(("name", "shape"), [("small_cnn", (1, 28, 28)), ("preact_resnet18", (3, 32, 32))])
def test_smooth_activations_share_the_relu_weights_and_change_the_outputs(name, shape):
    c = shape[0]

    def arch_with(activation: str) -> dict:
        config = ModelConfig(name=name, depth=10, activation=activation)
        return architecture(config, shape=shape, num_classes=10, mean=(0.5,) * c, std=(0.25,) * c)

    torch.manual_seed(0)
    relu = build_model(arch_with("relu")).eval()
    silu = build_model(arch_with("silu")).eval()
    silu.load_state_dict(relu.state_dict())  # strict: no activation holds a parameter
    assert not any(isinstance(m, torch.nn.ReLU) for m in silu.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in silu.modules())
    x = torch.rand(3, *shape)
    out_relu, out_silu = relu(x), silu(x)
    # Each ReLU swapped for SiLU: same weights, other function (its own forward, recomputed by hand for small_cnn).
    assert not torch.allclose(out_relu, out_silu, atol=1e-3)
    if name == "small_cnn":
        net, h = silu[1], silu[0](x)
        for layer in [*net.features, *net.classifier]:
            h = F.silu(h) if isinstance(layer, torch.nn.SiLU) else layer(h)
        assert torch.allclose(h, out_silu, atol=1e-5)
    # A model registered before the option (no "activation" key) rebuilds as ReLU.
    legacy = {k: v for k, v in arch_with("relu").items() if k != "activation"}
    rebuilt = build_model(legacy).eval()
    rebuilt.load_state_dict(relu.state_dict())
    assert torch.equal(rebuilt(x), out_relu)


def test_unknown_activations_are_refused():
    from pipeline.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="activation"):
        config_from_dict({"model": {"activation": "selu"}})
    arch = architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="unknown model activation 'swish'; allowed: relu, silu, gelu"):
        build_model({**arch, "activation": "swish"})


def test_bad_architectures_are_refused():
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model(
            architecture(
                ModelConfig(name="wide_resnet", depth=12),
                shape=(3, 32, 32),
                num_classes=10,
                mean=(0.5,) * 3,
                std=(0.2,) * 3,
            )
        )
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model(architecture(ModelConfig(), shape=(1, 10, 10), num_classes=10, mean=(0.5,), std=(0.2,)))


def test_cosine_and_piecewise_eps_ramps():
    from pipeline.schedules import eps_at

    assert eps_at(0.0, eps=0.2, ramp="cosine", ramp_epochs=4) == 0.0
    assert eps_at(2.0, eps=0.2, ramp="cosine", ramp_epochs=4) == pytest.approx(0.1)
    assert eps_at(1.0, eps=0.2, ramp="cosine", ramp_epochs=4) == pytest.approx(0.2 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert eps_at(4.0, eps=0.2, ramp="cosine", ramp_epochs=4) == pytest.approx(0.2)
    milestones = [[0, 0.0], [2, 0.5], [6, 1.0]]
    assert eps_at(1.0, eps=0.2, ramp="piecewise", ramp_epochs=0, milestones=milestones) == pytest.approx(0.05)
    assert eps_at(4.0, eps=0.2, ramp="piecewise", ramp_epochs=0, milestones=milestones) == pytest.approx(0.15)
    assert eps_at(9.0, eps=0.2, ramp="piecewise", ramp_epochs=0, milestones=milestones) == pytest.approx(0.2)


def test_attack_steps_grow_and_step_size_can_be_absolute():
    from pipeline.schedules import attack_steps_at

    assert [attack_steps_at(e, start=1, final=10, ramp_epochs=3) for e in (1, 2, 3, 4, 9)] == [1, 4, 7, 10, 10]
    assert attack_steps_at(1, start=0, final=10, ramp_epochs=3) == 10
    assert step_size(0.2, num_steps=10, factor=2.5, absolute=0.01) == 0.01


def test_piecewise_lr_decays_at_milestones():
    assert lr_factor(4.9, total_epochs=10, kind="piecewise", milestones=[5, 8]) == 1.0
    assert lr_factor(5.0, total_epochs=10, kind="piecewise", milestones=[5, 8]) == pytest.approx(0.1)
    assert lr_factor(9.0, total_epochs=10, kind="piecewise", milestones=[5, 8], decay=0.5) == pytest.approx(0.25)


def test_schedule_config_is_validated():
    from pipeline.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"needs schedule\.eps_milestones"):
        config_from_dict({"schedule": {"eps_ramp": "piecewise"}})
    with pytest.raises(ConfigError, match="sorted by epoch"):
        config_from_dict({"schedule": {"eps_ramp": "piecewise", "eps_milestones": [[5, 1.0], [0, 0.0]]}})
    with pytest.raises(ConfigError, match=r"needs optim\.lr_milestones"):
        config_from_dict({"optim": {"lr_schedule": "piecewise"}})


def test_epoch_schedule_applies_steps_ramp():
    from pipeline.config import config_from_dict
    from pipeline.training.plan import epoch_schedule

    config = config_from_dict(
        {
            "attack": {"eps": 0.2, "num_steps": 10},
            "schedule": {"steps_start": 2, "steps_ramp_epochs": 4, "eps_ramp_epochs": 2},
        }
    )
    eps_for_step, attack = epoch_schedule(config, 1, steps_per_epoch=10)
    assert attack.num_steps == 2 and eps_for_step(5) == pytest.approx(0.05)
    _, attack = epoch_schedule(config, 5, steps_per_epoch=10)
    assert attack.num_steps == 10


def test_eps_train_factor_scales_training_eps_only():
    from pipeline.config import ConfigError, config_from_dict
    from pipeline.training.plan import epoch_schedule

    config = config_from_dict({"attack": {"eps": 0.1}, "schedule": {"eps_ramp_epochs": 2, "eps_train_factor": 1.2}})
    eps_for_step, _ = epoch_schedule(config, 1, steps_per_epoch=10)
    assert eps_for_step(5) == pytest.approx(0.1 * 1.2 * 0.25)
    eps_for_step, _ = epoch_schedule(config, 3, steps_per_epoch=10)
    assert eps_for_step(0) == pytest.approx(0.12)
    # The threat model, which validation and evaluation read, is unchanged.
    assert config.attack.eps == 0.1
    with pytest.raises(ConfigError, match=r"eps_train_factor"):
        config_from_dict({"schedule": {"eps_train_factor": 0.5}})


def test_crop_flip_shifts_and_flips_within_the_padding():
    from pipeline.training.steps import crop_flip

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        # Each output is some 8x8 window of the padded image, possibly mirrored, same for every channel.
        windows = [
            padded[i, :, r : r + 8, c : c + 8].flip(2) if f else padded[i, :, r : r + 8, c : c + 8]
            for r in range(9)
            for c in range(9)
            for f in (False, True)
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(
        crop_flip(x, torch.Generator().manual_seed(1)), crop_flip(x, torch.Generator().manual_seed(2))
    )


def test_weight_average_warms_up_then_follows_its_decay():
    from pipeline.training import WeightAverage

    model, start = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    for module, value in ((model, 1.0), (start, 0.0)):
        torch.nn.init.constant_(module.weight, value)
        torch.nn.init.constant_(module.bias, value)
    average = WeightAverage(start, decay=0.99)
    # Update 0 uses min(0.99, 1/10) = 0.1: the average is mostly the current weights already.
    average.update(model)
    assert torch.allclose(average.model.weight, torch.tensor([[0.9]]))
    # Far into training the decay itself applies: 0.99 * 0.9 + 0.01 * 2.0 = 0.911.
    torch.nn.init.constant_(model.weight, 2.0)
    average.updates = 10_000
    average.update(model)
    assert torch.allclose(average.model.weight, torch.tensor([[0.911]]))
    assert average.updates == 10_001


def test_weight_average_copies_batchnorm_statistics():
    from pipeline.training import WeightAverage

    model = torch.nn.BatchNorm1d(2)
    average = WeightAverage(torch.nn.BatchNorm1d(2), decay=0.999)
    model.train()(torch.randn(8, 2) * 3 + 5)
    average.update(model)
    assert torch.equal(average.model.running_mean, model.running_mean)
    assert torch.equal(average.model.running_var, model.running_var)
