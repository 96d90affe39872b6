"""Bring your own model, in process: user networks by import path (kwargs, normalisation, tuple/dict
outputs), their checks, their code travelling with the saved model into a fresh process, model.init
(round trip, reset_head, key lists) and the fine-tuning learning rates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from user_package import write_user_package

from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import ModelError
from pipeline.model_folder import ARCH_FILE, load_folder, save_weights
from pipeline.models import (
    architecture,
    build_model,
    check_architecture,
    check_outputs,
    code_location,
    head_parameter_names,
    load_pretrained,
)
from pipeline.training.steps import make_optimizer

SHAPE = (1, 8, 8)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    module = write_user_package(tmp_path / "src")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return module


def user_arch(module: str, function: str = "build", **model) -> dict:
    config = config_from_dict({"model": {"name": f"{module}:{function}", **model}})
    code = code_location(config.model.name)
    return architecture(config.model, shape=SHAPE, num_classes=10, mean=(0.3,), std=(0.4,), code=code.name)


def test_user_network_gets_normalisation_in_front_and_its_logits_picked(user_module):
    arch = user_arch(user_module, kwargs={"width": 4}, normalize={"mean": [0.5], "std": [0.25]}, output=0)
    check_architecture(arch)
    model = build_model(arch).eval()
    check_outputs(model, shape=SHAPE, num_classes=10, name=arch["name"])
    x = torch.rand(3, *SHAPE)
    logits, _features = model[1]((x - 0.5) / 0.25)
    assert torch.equal(model(x), logits)
    assert model[1].conv.out_channels == 4  # the kwargs reached the function
    # The user network keeps its own memory format (its .view would fail on NHWC activations).
    assert model[1].conv.weight.is_contiguous()


def test_dict_output_by_key_and_no_normalisation_means_pixels_go_in_as_they_are(user_module):
    arch = user_arch(user_module, "dict_output", output="logits")
    model = build_model(arch).eval()
    x = torch.rand(2, *SHAPE)
    assert arch["normalize"] is None and isinstance(model[0], torch.nn.Identity)
    assert torch.equal(model(x), model[1](x)["logits"])


@pytest.mark.parametrize(
    ("function", "output", "match"),
    [
        ("build", "", r"returns a tuple of 2, not a logits tensor; set model.output"),
        ("dict_output", "", r"returns a dict with keys 'logits', 'features'.*set model.output"),
        ("build", 1, r"returns shape \[2, 64\] .*must return float logits of shape \[2, 10\]"),
        ("not_a_module", "", r"returned a str, not a torch.nn.Module"),
    ],
)
def test_wrong_outputs_are_named(user_module, function, output, match):
    config = config_from_dict({"model": {"name": f"{user_module}:{function}", "output": output}})
    arch = architecture(config.model, shape=SHAPE, num_classes=10, mean=(0.3,), std=(0.4,), code="x")
    with pytest.raises(ModelError, match=match):
        check_outputs(build_model(arch), shape=SHAPE, num_classes=10, name=config.model.name)


def test_unimportable_module_missing_function_and_bad_kwargs_are_named(user_module):
    cases = [
        ("no_such_pkg.nets:build", {}, r"module 'no_such_pkg.nets' cannot be imported.*PYTHONPATH"),
        (f"{user_module}:biuld", {}, r"has no 'biuld'; its functions and classes: .*build"),
        (f"{user_module}:build", {"depth": 3}, r"model.kwargs \{'depth': 3\} failed: TypeError"),
    ]
    for name, kwargs, match in cases:
        config = config_from_dict({"model": {"name": name, "kwargs": kwargs}})
        arch = architecture(config.model, shape=SHAPE, num_classes=10, mean=(0.3,), std=(0.4,), code="x")
        with pytest.raises(ModelError, match=match):
            build_model(arch)


def test_config_refuses_malformed_user_model_keys():
    bad = [
        ({"name": "pkg.mod:fn()"}, "not an import path"),
        ({"name": "small_cnn", "kwargs": {"a": 1}}, "for user models"),
        ({"name": "pkg.mod:fn", "output": 1000}, "index 0-999"),
        ({"name": "pkg.mod:fn", "normalize": {"mean": [0.5], "std": [0.0]}}, "std values must be > 0"),
        ({"name": "pkg.mod:fn", "normalize": {"mean": [0.5, 0.5], "std": [0.2]}}, "one value per channel"),
        ({"name": "small_cnn", "init": "weights.pt"}, "expected a .safetensors file"),
        ({"name": "small_cnn", "init": "models:/x y@a"}, "expected models:/NAME@ALIAS"),
        ({"name": "small_cnn", "reset_head": "fc/../x"}, "not a module path"),
    ]
    for model, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"model": model})
    with pytest.raises(ConfigError, match=r"set model\.reset_head"):
        config_from_dict({"optim": {"backbone_lr_scale": 0.1}})
    # One entry of a table-valued key, from the command line.
    config = config_from_dict({"model": {"name": "pkg.mod:fn", "kwargs": {"a": 1}}}, {"model.kwargs.b": 2})
    assert config.model.kwargs == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match="is not a table"):
        config_from_dict({}, {"attack.eps.x": 1})


def test_saved_user_model_loads_in_a_fresh_process_elsewhere_from_its_own_code(user_module, tmp_path):
    arch = user_arch(user_module, output=0, normalize={"mean": [0.5], "std": [0.25]})
    torch.manual_seed(0)
    model = build_model(arch).eval()
    save_weights(model, arch, tmp_path / "saved", code=code_location(arch["name"]))
    x = torch.rand(4, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    script = (
        "import sys, torch; from pipeline.model_folder import load_folder; "
        f"m, _, _ = load_folder({str(tmp_path / 'saved')!r}); "
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r}); "
        f"print(sys.modules[{user_module!r}].__file__)"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # pipeline itself, not the user's package
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "advtrain-code" in done.stdout  # imported from the code shipped with the model
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_a_record_cannot_reach_code_it_did_not_ship(tmp_path):
    """architecture.json names what to import: `os:system` (or a shipped package called os) is refused."""
    arch = {
        "name": "os:system",
        "kwargs": {"command": "touch /tmp/pwned"},
        "shape": [1, 8, 8],
        "num_classes": 10,
        "normalize": None,
        "output": None,
        "code": "os",
    }
    folder = tmp_path / "m"
    save_weights(torch.nn.Sequential(torch.nn.Identity()), arch, folder)
    with pytest.raises(ModelError, match=r"needs its code 'os', which is not in code/"):
        load_folder(folder)
    (folder / "code" / "os").mkdir(parents=True)
    (folder / "code" / "os" / "__init__.py").write_text("def system(command): pass\n")
    record = json.loads((folder / ARCH_FILE).read_text())
    (folder / ARCH_FILE).write_text(json.dumps({**record, "weights_sha256": record["weights_sha256"]}))
    with pytest.raises(ModelError, match=r"module 'os' was imported from .*not the code shipped"):
        load_folder(folder)


def builtin_arch(num_classes: int = 10, reset_head: str = "") -> dict:
    config = config_from_dict({"model": {"name": "small_cnn", "reset_head": reset_head}})
    return architecture(config.model, shape=SHAPE, num_classes=num_classes, mean=(0.3,), std=(0.4,))


def test_init_round_trip_from_a_saved_model_and_from_a_bare_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_model(builtin_arch())
    save_weights(source, builtin_arch(), tmp_path / "saved")
    save_file({k: v.contiguous() for k, v in source[1].state_dict().items()}, str(tmp_path / "net.safetensors"))
    for weights in (tmp_path / "saved" / "model.safetensors", tmp_path / "net.safetensors"):
        torch.manual_seed(1)
        target = build_model(builtin_arch())
        load_pretrained(target, weights, arch=builtin_arch())
        for key, value in source[1].state_dict().items():
            assert torch.equal(target[1].state_dict()[key], value), key


def test_reset_head_gives_a_new_class_count_and_keeps_every_other_weight(tmp_path):
    torch.manual_seed(0)
    source = build_model(builtin_arch())
    save_weights(source, builtin_arch(), tmp_path / "saved")
    arch = builtin_arch(num_classes=3, reset_head="classifier.5")
    target = build_model(arch)
    load_pretrained(target, tmp_path / "saved" / "model.safetensors", arch=arch)
    assert target(torch.rand(2, *SHAPE)).shape == (2, 3)
    for key, value in source[1].state_dict().items():
        if not key.startswith("classifier.5."):
            assert torch.equal(target[1].state_dict()[key], value), key
    assert head_parameter_names(arch) == {"1.classifier.5.weight", "1.classifier.5.bias"}
    with pytest.raises(ModelError, match=r"model.reset_head 'classifier.4' is a ReLU"):
        build_model(builtin_arch(reset_head="classifier.4"))


def test_init_that_does_not_fit_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_model(builtin_arch(num_classes=3))[1].state_dict().items()}
    del state["features.0.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError) as info:
        load_pretrained(build_model(builtin_arch()), tmp_path / "w.safetensors", arch=builtin_arch())
    message = str(info.value)
    assert "missing keys (1): features.0.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "shape mismatches (2): " in message
    assert "classifier.5.weight (file F32[3, 200], model F32[10, 200])" in message
    assert "set model.reset_head" in message


def test_backbone_learns_slower_than_the_new_head():
    config = config_from_dict({"model": {"reset_head": "classifier.5"}, "optim": {"backbone_lr_scale": 0.1}})
    arch = builtin_arch(reset_head="classifier.5")
    model = build_model(arch)
    optimizer = make_optimizer(model, config.optim, head=head_parameter_names(arch))
    head, body = optimizer.param_groups
    assert head["lr"] == config.optim.lr and body["lr"] == pytest.approx(config.optim.lr * 0.1)
    assert {id(p) for p in head["params"]} == {id(model[1].classifier[5].weight), id(model[1].classifier[5].bias)}
    assert len(body["params"]) == len(list(model.parameters())) - 2
