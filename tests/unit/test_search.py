"""Search files are checked before any trial starts (no Ray started here: only parsing and pure helpers)."""

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.orchestrate.search_report import pareto_front
from pipeline.orchestrate.tune import param_space
from pipeline.search import load_search, parse_search

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base():
    return load_config(ROOT / "jobs/configs/digits_demo.toml")


@pytest.mark.parametrize("name", ["search_digits.toml", "search_fashion_mnist.toml"])
def test_shipped_search_files_load(name):
    run = "digits_demo.toml" if "digits" in name else "fashion_mnist_pgd.toml"
    search = load_search(ROOT / "jobs/configs" / name, load_config(ROOT / "jobs/configs" / run))
    assert search.space and set(param_space(search)) == set(search.space)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"attack.epss": {"choice": [0.1]}}, "unknown key 'attack.epss'. Did you mean 'attack.eps'?"),
        ({"attack.eps": {"choice": []}}, "space.attack.eps.choice is empty"),
        ({"optim.lr": {"uniform": [0.1, 0.01]}}, "space.optim.lr.uniform: low 0.1 > high 0.01"),
        ({"optim.lr": {"loguniform": [0.0, 0.01]}}, "loguniform needs low > 0"),
        ({"attack.eps": {"normal": [0.1, 0.2]}}, "unknown distribution (space.attack.eps) 'normal'"),
        ({"attack.eps": {"choice": [0.1, -1.0]}}, "space.attack.eps: value -1.0 is refused by the run config"),
        ({"method.name": {"choice": ["pgd_at", "fgsm"]}}, "value 'fgsm' is refused"),
        ({"validation.num_steps": {"choice": [5, 10]}}, "'validation.num_steps' cannot be searched"),
        ({"run.epochs": {"randint": [1, 5]}}, "'run.epochs' cannot be searched"),
        ({"attack.num_steps": {"randint": [1.5, 5]}}, "randint needs integer bounds"),
        ({}, "[space] is empty"),
    ],
)
def test_bad_search_files_are_refused_naming_the_problem(base, space, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_search({"space": space}, base)


def test_bad_settings_and_tables_are_refused(base):
    with pytest.raises(ConfigError, match=re.escape("unknown table 'serach'. Did you mean 'search'?")):
        parse_search({"serach": {}, "space": {"attack.eps": {"choice": [0.1]}}}, base)
    with pytest.raises(ConfigError, match="num_samples"):
        parse_search({"search": {"num_samples": 0}, "space": {"attack.eps": {"choice": [0.1]}}}, base)
    with pytest.raises(ConfigError, match="'optuna' cannot take grid entries"):
        parse_search({"search": {"algorithm": "optuna"}, "space": {"attack.eps": {"grid": [0.1, 0.2]}}}, base)


def test_nested_space_tables_and_inclusive_randint(base):
    search = parse_search({"space": {"attack": {"eps": {"grid": [0.1, 0.2]}, "num_steps": {"randint": [2, 3]}}}}, base)
    space = param_space(search)
    assert space["attack.eps"] == {"grid_search": [0.1, 0.2]}
    assert (space["attack.num_steps"].lower, space["attack.num_steps"].upper) == (2, 4)  # Tune's upper is exclusive


def test_pareto_front():
    points = [(0.9, 0.5), (0.8, 0.6), (0.7, 0.55), (0.9, 0.4), (0.95, 0.3)]
    assert pareto_front(points) == [True, True, False, False, True]


def test_search_algorithms_are_built_with_the_concurrency_limit(base):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.orchestrate.tune import _search_alg

    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    optuna = _search_alg(parse_search({"search": {"algorithm": "optuna"}, "space": space}, base), 3)
    assert isinstance(optuna, ConcurrencyLimiter) and isinstance(optuna.searcher, OptunaSearch)
    assert optuna.max_concurrent == 3
    basic = _search_alg(parse_search({"space": space}, base), 2)
    assert isinstance(basic, BasicVariantGenerator) and basic.max_concurrent == 2
