import math

import pytest
import torch

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
