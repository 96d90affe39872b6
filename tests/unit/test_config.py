import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict, flat_params, load_config, parse_override, to_toml
from pipeline.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
ROOT_CONFIGS = "jobs/configs"


def test_recipe_loads_and_overrides_apply():
    config = load_config(f"{ROOT_CONFIGS}/digits_demo.toml", ["attack.eps=0.25", "run.epochs=3"])
    assert config.attack.eps == 0.25
    assert config.run.epochs == 3
    assert config.scaling.num_workers == 2


def test_flat_params_uses_dotted_keys():
    params = flat_params(config_from_dict({"attack": {"eps": 0.3}}))
    assert params["attack.eps"] == 0.3
    assert "scaling.num_workers" in params and "optim.lr" in params


def test_toml_round_trip(tmp_path):
    config = config_from_dict(
        {
            "attack": {"eps": 0.3, "norm": "l2"},
            "run": {"name": "a-named.run_1"},
            "tracking": {"experiment": 'a "quoted" name'},
        }
    )
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"attack": {"epss": 0.1}}, "unknown key 'attack.epss'. Did you mean 'attack.eps'?"),
        ({"atack": {"eps": 0.1}}, "unknown table 'atack'. Did you mean 'attack'?"),
        ({"attack": {"eps": -0.1}}, "attack.eps: Input should be greater than or equal to 0"),
        ({"attack": {"num_steps": 0}}, "attack.num_steps"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
        ({"attack": {"name": "cw"}}, "attack.name: Value error, 'cw' is not a registered training attack"),
        ({"attack": {"name": "apgd_ce"}}, "Allowed: fgsm, pgd"),
        ({"attack": {"name": "fgsm", "num_steps": 3}}, "set attack.num_steps = 1"),
        ({"method": {"name": "tradse"}}, "Did you mean 'trades'?"),
        ({"method": {"name": "free_at", "awp_gamma": 0.01}, "attack": {"name": "fgsm", "num_steps": 1}}, "not free_at"),
        ({"model": {"name": "resnet50"}}, "model.name"),
        ({"run": {"epochs": "ten"}}, "run.epochs"),
        ({"run": {"epochs": 2.5}}, "run.epochs"),
        ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu"),
        ({"method": {"name": "fgsm_rs"}}, "set attack.name = 'fgsm'"),
        ({"attack": {"eps": 0.0}}, "attack.eps is 0"),
        ({"tracking": {"alias": "champion"}}, "only `advtrain promote` sets it"),
        ({"run": {"weight_average_decay": 1.0}}, "run.weight_average_decay: Input should be less than 1"),
        ({"scaling": {"sync_batchnorm": True}}, "set scaling.use_gpu = true"),
        (
            {"scaling": {"sync_batchnorm": True, "use_gpu": True}, "method": {"attack_mode": "train"}},
            "Set method.attack_mode = 'eval'",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert expected in str(err.value)


def test_unknown_plugin_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="Allowed: small_cnn, preact_resnet18, wide_resnet"):
        config_from_dict({"model": {"name": "vgg"}})


def test_config_accepts_exactly_the_registered_plugin_names():
    """The config's allowed names are the registries' (one list per plug point, nothing to keep in step)."""
    from pipeline.attacks import ATTACKS, TRAINING_ATTACKS
    from pipeline.methods import METHODS
    from pipeline.models import MODELS

    for name in MODELS:
        assert config_from_dict({"model": {"name": name}}).model.name == name
    for name, spec in METHODS.items():
        attack = {"name": spec.attack or "pgd", "num_steps": 1 if spec.attack == "fgsm" else 3}
        eps = 0.1 if spec.adversarial else 0.0
        config = config_from_dict({"method": {"name": name}, "attack": {**attack, "eps": eps}})
        assert config.method.name == name
    assert TRAINING_ATTACKS == ("fgsm", "pgd", "deepfool")
    for name in ATTACKS:
        if name in TRAINING_ATTACKS:
            assert config_from_dict({"attack": {"name": name, "num_steps": 1}}).attack.name == name
        else:
            with pytest.raises(ConfigError, match="not a registered training attack"):
                config_from_dict({"attack": {"name": name}})


def test_an_attack_option_the_training_attack_does_not_take_is_refused_not_ignored():
    """DeepFool has no step size, random start or restarts: setting one is an error naming the key."""
    assert config_from_dict({"attack": {"name": "deepfool", "num_steps": 20}}).attack.num_steps == 20
    for key, value in (("random_start", False), ("step_size_factor", 1.0), ("num_restarts", 2), ("step_size", 0.1)):
        with pytest.raises(ConfigError, match=rf"does not take attack\.{key}"):
            config_from_dict({"attack": {"name": "deepfool", key: value}})


def test_overrides_parse_toml_literals():
    assert parse_override("attack.eps=0.2") == ("attack.eps", 0.2)
    assert parse_override("scaling.use_gpu=true") == ("scaling.use_gpu", True)
    assert parse_override("method.name=pgd_at") == ("method.name", "pgd_at")
    with pytest.raises(ConfigError, match=re.escape("table.key=value")):
        parse_override("attack.eps")
    with pytest.raises(ConfigError, match=re.escape("must be table.key")):
        parse_override("eps=0.1")


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[attack\neps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_config_is_frozen():
    config = config_from_dict({})
    with pytest.raises(Exception, match="frozen"):
        config.attack.eps = 1.0  # type: ignore[misc]


RUN_RECIPES = sorted(
    p for p in (ROOT / "jobs/configs").glob("*.toml") if p.name != "promotion.toml" and not p.name.startswith("search_")
)


@pytest.mark.parametrize("recipe", RUN_RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_its_model_builds(recipe):
    import torch

    from pipeline.models import architecture, build_model

    config = load_config(recipe)
    shape = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[Path(config.data.path).name]
    model = build_model(
        architecture(config.model, shape=shape, num_classes=10, mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    )
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    if METHODS[config.method.name].single_step:
        assert config.method.co_guard, f"{recipe.name}: single-step recipes keep the catastrophic-overfitting guard on"
