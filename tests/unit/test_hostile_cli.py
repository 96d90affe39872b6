"""Hostile and broken input through the CLI's one error path (`pipeline.cli.run`, in this process; every
case fails before Ray or MLflow would start): exit code 2 and a message naming the problem for bad
input, 3 and a log file for a bug, and nothing written where a write could happen. The data and model
folder classes are in test_hostile_data.py and test_hostile_models.py, the registry's in
tests/integration/test_registry.py."""

from __future__ import annotations

import hashlib
import random
import re
import socket
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.errors import InputError, checked_alias, checked_name

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs/configs/digits_demo.toml"


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: what "unchanged" is checked against."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _train(capsys, tmp_path, *sets: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    args = ["train", "--config", str(DEMO), "--set", f'run.storage_path="{tmp_path / "runs"}"']
    for s in sets:
        args += ["--set", s]
    return _run(capsys, *args, *extra)


# ------------------------------------------------------------------ values that pass a type check but are impossible


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("attack.eps=inf", "attack.eps"),
        ("attack.eps=nan", "attack.eps"),
        ("attack.eps=1.5", "attack.eps"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=1e300", "optim.lr"),
        ("data.batch_size=9223372036854775807", "data.batch_size"),
        ("run.epochs=-3", "run.epochs"),
        ("schedule.eps_ramp_epochs=nan", "schedule.eps_ramp_epochs"),
        ("optim.lr_milestones=[1.0, inf]", "optim.lr_milestones"),
        ('tracking.registered_model="digits\'linf"', "tracking.registered_model"),
        ('tracking.registered_model="../x"', "tracking.registered_model"),
        ('tracking.alias="latest"', "reserved by MLflow"),
        ('tracking.alias="v3"', "reserved by MLflow"),
        ('tracking.alias="a b"', "tracking.alias"),
        ("attack={ eps = 0.1 }", "attack"),
        ("attack.eps={ value = 0.1 }", "attack.eps"),
        ("attack.eps=" + "[" * 3000 + "]" * 3000, "nested too deeply"),
    ],
)
def test_impossible_values_exit_2_naming_the_key_and_write_nothing(capsys, tmp_path, override, named):
    code, text = _train(capsys, tmp_path, override)
    assert code == cli.EXIT_BAD_INPUT, text
    assert named in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ names that become paths


@pytest.mark.parametrize("name", ["../..", "../escape", "/etc", "a/b", ".hidden", "x'y", "", "a" * 200])
def test_names_that_would_leave_the_storage_folder_are_refused(capsys, tmp_path, name):
    (tmp_path / "outside").mkdir()
    search = tmp_path / "search.toml"
    search.write_text('[space]\n"optim.lr" = { choice = [0.001] }\n')
    before = _tree(tmp_path)
    for extra, sets in (((), (f'run.name="{name}"',)), (("--resume", name), ())):
        if not name and not extra:
            continue  # an empty run.name means "a unique one"
        code, text = _train(capsys, tmp_path, *sets, extra=extra)
        assert code == cli.EXIT_BAD_INPUT, text
        assert "not allowed" in text and "A-Z a-z 0-9" in text
    code, text = _run(capsys, "tune", "--config", str(DEMO), "--search", str(search), "--name", name)
    assert code == cli.EXIT_BAD_INPUT and "--name" in text, text
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["outside", "search.toml"]


def test_the_name_pattern_is_one_rule_with_one_message():
    for good in ("digits-linf", "run.1_a", "A" * 128):
        assert checked_name(good, "x") == good
    for bad in ("..", "a/b", "a\\b", "a'b", 'a"b', "a b", "-a", "é", "a" * 129, "a\nb"):
        with pytest.raises(InputError, match=re.escape("1-128 characters")):
            checked_name(bad, "x")
    for reserved in ("latest", "LATEST", "v1", "V12"):
        with pytest.raises(InputError, match="reserved by MLflow"):
            checked_alias(reserved)
    assert checked_alias("champion") == "champion" and checked_alias("v1x") == "v1x"


# ------------------------------------------------------------------ files that are not configs


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"\xff\xfe\x00\x01binary\x00", "not UTF-8"),
        (b"[run\nepochs = ", "not valid TOML"),
        (b"x = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"attack = 3\n", "[attack] must be a table"),
        (b"[attack]\neps = { nested = 1 }\n", "attack.eps"),
        (b"[attack]\neps = 0.1\neps = 0.2\n", "not valid TOML"),
    ],
)
def test_broken_config_files_exit_2_naming_the_file(capsys, tmp_path, content, named):
    config = tmp_path / "bad.toml"
    config.write_bytes(content)
    code, text = _run(capsys, "train", "--config", str(config))
    assert code == cli.EXIT_BAD_INPUT, text
    assert named in text and "bad.toml" in text and "Traceback" not in text


def test_a_folder_or_missing_file_as_config(capsys, tmp_path):
    for path in (tmp_path, tmp_path / "missing.toml"):
        code, text = _run(capsys, "train", "--config", str(path))
        assert code == cli.EXIT_BAD_INPUT and "not found" in text, text


def test_config_fuzz_raises_only_config_errors(tmp_path):
    """Seeded mutations of a real recipe (line drops, value swaps, byte flips, truncation, junk); each
    either loads or raises ConfigError, never anything else."""
    rng = random.Random(0)
    text = DEMO.read_text()
    junk = ["inf", "nan", "-1", "1e309", '"x"', "[]", "{}", "[[1]]", "true", "{ a = 1 }", "9" * 30, "'", '"\\u0000"']
    path = tmp_path / "fuzz.toml"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        lines = text.splitlines()
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            kind = rng.randrange(4)
            if kind == 0:
                del lines[i]
            elif kind == 1 and "=" in lines[i]:
                lines[i] = lines[i].split("=")[0] + "= " + rng.choice(junk)
            elif kind == 2:
                lines.insert(i, rng.choice(["[run]", "[bogus]", "x = 1", "[[attack]]", "a.b.c = 2"]))
            else:
                lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        data = "\n".join(lines).encode()
        if rng.random() < 0.3:
            flip = rng.randrange(len(data))
            data = data[:flip] + bytes([rng.randrange(256)]) + data[flip + 1 :]
        path.write_bytes(data)
        try:
            load_config(path)
            outcomes["loaded"] += 1
        except ConfigError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


# ------------------------------------------------------------------ evaluate and promote: options checked first


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--num-examples", "-5"), "--num-examples -5"),
        (("--eps", "nan"), "--eps nan"),
        (("--eps", "inf"), "--eps inf"),
        (("--eps", "-0.1"), "--eps -0.1"),
        (("--split", "training"), "--split 'training'"),
        (("--protocol", "autoattack"), "autoattack"),
        (("--chunk-size", "0"), "--chunk-size 0"),
        *([(("--device", "cuda"), "--device cuda: this machine has no CUDA")] if not torch.cuda.is_available() else []),
    ],
)
def test_impossible_evaluation_requests_exit_2_before_anything_starts(capsys, tmp_path, args, named):
    code, text = _run(capsys, "evaluate", "--model", str(tmp_path), *args)
    assert code == cli.EXIT_BAD_INPUT, text
    assert named in text and "Traceback" not in text


def test_an_out_that_is_a_file_is_refused_and_left_alone(capsys, tmp_path):
    out = tmp_path / "report"
    out.write_text("mine")
    code, text = _run(capsys, "evaluate", "--model", str(tmp_path), "--out", str(out))
    assert code == cli.EXIT_BAD_INPUT and "is a file" in text, text
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        ('protocol = "autoattack"\n', "'autoattack' is not a registered evaluation protocol"),
        ("margin = nan\n", "margin"),
        ("clean_floor = 2.0\n", "clean_floor"),
        ("min_examples = 0\n", "min_examples"),
        ("unknown = 1\n", "unknown"),
    ],
)
def test_impossible_promotion_policies_exit_2(capsys, tmp_path, policy, named):
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    code, text = _run(capsys, "promote", "--name", "m", "--version", "1", "--policy", str(path))
    assert code == cli.EXIT_BAD_INPUT, text
    assert named in text and "policy.toml" in text


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--alias", "latest"), "reserved by MLflow"),
        (("--alias", "v2"), "reserved by MLflow"),
        (("--alias", "two words"), "--alias"),
        (("--alias", ""), "--alias"),
        (("--version", "latest"), "reserved by MLflow"),
    ],
)
def test_registry_names_mlflow_would_refuse_exit_2_before_any_request(capsys, monkeypatch, args, named):
    # Nothing listens at this address: the command must fail on the name, before it talks to a server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    base = {"--name": "digits-linf", "--version": "1"}
    argv = ["promote"]
    for key, value in base.items():
        if key not in args:
            argv += [key, value]
    code, text = _run(capsys, *argv, *args)
    assert code == cli.EXIT_BAD_INPUT, text
    assert named in text and "cannot reach" not in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_named_not_reported_as_a_missing_model(capsys, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for argv in (("models", "list"), ("models", "show", "digits-linf"), ("rollback", "--name", "digits-linf")):
        code, text = _run(capsys, *argv)
        assert code == cli.EXIT_BAD_INPUT, text
        assert f"cannot reach the MLflow tracking server at {uri}" in text
        assert "no registered model" not in text


def test_a_model_name_with_a_quote_is_refused_not_passed_into_a_filter(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, text = _run(capsys, "models", "list", "x' OR name LIKE '%")
    assert code == cli.EXIT_BAD_INPUT and "registered model" in text, text


# ------------------------------------------------------------------ exit codes


def test_usage_errors_exit_2(capsys):
    assert _run(capsys, "train", "--no-such-option")[0] == cli.EXIT_BAD_INPUT
    assert _run(capsys, "evaluate", "--model", "m", "--protocol", "nope")[0] == cli.EXIT_BAD_INPUT


def test_a_bug_exits_3_with_the_traceback_in_a_log_file(capsys, tmp_path, monkeypatch):
    """Not an InputError: a bug. Its exit code differs from a refused promotion's (1), and the traceback
    goes to a file the message names, not to the user's screen."""
    import pipeline.config

    def broken(*_args, **_kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(pipeline.config, "load_config", broken)
    monkeypatch.setenv("ADVTRAIN_LOG_DIR", str(tmp_path / "logs"))
    code, text = _run(capsys, "train", "--config", str(DEMO))
    assert code == cli.EXIT_BUG == 3
    assert "a bug, not your input" in text and "Traceback" not in text
    logs = list((tmp_path / "logs").glob("advtrain-crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in text
    assert "RuntimeError: an internal invariant broke" in logs[0].read_text()


# ------------------------------------------------------------------ data and model folders through the commands


def _bad_npz(path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 8, 8), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=rng.integers(0, 10, 90), x_test=x[:20], y_test=rng.integers(0, 10, 20))
    return path


def test_data_commands_exit_2_and_leave_the_dataset_as_it_was(capsys, tmp_path, digits_path):
    """The data corpus (test_hostile_data.py) through `advtrain data`: exit 2, the file named, and an
    existing dataset given as --out left byte for byte."""
    import shutil

    dataset = tmp_path / "digits"
    shutil.copytree(digits_path, dataset)
    before = _tree(dataset)
    code, text = _run(
        capsys, "data", "prepare", "npz", "--source", str(_bad_npz(tmp_path / "lies.npz")), "--out", str(dataset)
    )
    assert code == cli.EXIT_BAD_INPUT and "lies.npz" in text and "90" in text, text
    (tmp_path / "a-file").write_text("mine")
    code, text = _run(capsys, "data", "prepare", "digits", "--out", str(tmp_path / "a-file"))
    assert code == cli.EXIT_BAD_INPUT and "a-file" in text, text
    assert (tmp_path / "a-file").read_text() == "mine"
    meta = dataset / "metadata.json"
    meta.write_text(meta.read_text().replace('"num_classes": 10', '"num_classes": 1000'))
    code, text = _run(capsys, "data", "validate", str(dataset))
    assert code == cli.EXIT_BAD_INPUT and "metadata.json" in text and "1000" in text, text
    assert {k: v for k, v in _tree(dataset).items() if k != "metadata.json"} == {
        k: v for k, v in before.items() if k != "metadata.json"
    }
    assert _run(capsys, "data", "prepare", "digits", "--seed", "-1", "--out", str(tmp_path / "d"))[0] == 2


def test_evaluating_a_broken_model_folder_exits_2_before_ray_starts(capsys, tmp_path):
    """The model corpus (test_hostile_models.py) through `advtrain evaluate`: refused before Ray starts."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "architecture.json").write_text('{"name": "small_cnn", "num_classes": "10"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 7)
    import ray

    ray_before = ray.is_initialized()  # in the full suite, the integration tests' instance may be up
    code, text = _run(capsys, "evaluate", "--model", str(folder), "--num-examples", "10")
    assert code == cli.EXIT_BAD_INPUT and "architecture.json" in text, text
    assert ray.is_initialized() == ray_before


def test_a_model_that_cannot_take_the_datasets_images_is_refused_before_anything_starts(
    capsys, tmp_path, digits_path, monkeypatch
):
    """Valid config, valid data, but no such network for them: refused before Ray, MLflow or a run
    folder (it once failed inside the Ray workers, after the MLflow run was opened)."""
    monkeypatch.chdir(tmp_path)
    sets = (f'data.path="{digits_path}"', 'model.name="wide_resnet"', "model.depth=17")
    import ray

    ray_before = ray.is_initialized()  # in the full suite, the integration tests' instance may be up
    code, text = _train(capsys, tmp_path, *sets)
    assert code == cli.EXIT_BAD_INPUT and "6n+4" in text and "wide_resnet" in text, text
    assert ray.is_initialized() == ray_before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bring your own model and data, refused early


def test_a_user_model_that_cannot_be_imported_or_built_is_refused_before_anything_starts(
    capsys, tmp_path, digits_path, monkeypatch
):
    """Each problem with a user's model function exits 2 naming it, before Ray, MLflow or a run folder."""
    from user_package import write_user_package

    module = write_user_package(tmp_path / "src")
    monkeypatch.chdir(tmp_path / "src")  # the package is found from the folder the command runs in
    run_dir = tmp_path / "work"
    import ray

    ray_before = ray.is_initialized()
    cases = [
        ("no_such_pkg.nets:build", (), "cannot be imported"),
        (f"{module}:biuld", (), "has no 'biuld'"),
        (f"{module}:build", ("model.kwargs.depth=3",), "check model.kwargs"),
        (f"{module}:build", (), "returns a tuple of 2, not a logits tensor; set model.output"),
        (f"{module}:not_a_module", (), "returned a str"),
        (f"{module}:build", ("model.output=1",), r"must return float logits of shape \[2, 10\]"),
        (f"{module}:build", ("model.output=0", 'model.init="missing.safetensors"'), "model.init 'missing.safetensors'"),
    ]
    for name, extra, match in cases:
        sets = (f'data.path="{digits_path}"', f'model.name="{name}"', *extra)
        code, text = _train(capsys, run_dir, *sets)
        assert code == cli.EXIT_BAD_INPUT and re.search(match, text), (name, extra, text)
    assert ray.is_initialized() == ray_before
    assert not run_dir.exists() and not (tmp_path / "src" / "mlruns").exists()


def test_byo_command_options_are_checked(capsys, tmp_path, digits_path):
    code, text = _run(capsys, "data", "prepare", "digits", "--out", str(tmp_path / "d"), "--size", "8", "8")
    assert code == cli.EXIT_BAD_INPUT and "--size does not apply to digits" in text, text
    code, text = _run(capsys, "evaluate", "--model", "mynets.cnn:build", "--data", str(digits_path))
    assert code == cli.EXIT_BAD_INPUT and "needs --weights" in text, text
    code, text = _run(capsys, "evaluate", "--model", "small_cnn", "--weights", str(tmp_path / "w.safetensors"))
    assert code == cli.EXIT_BAD_INPUT and "pass --data FOLDER" in text, text
    args = ["--data", str(digits_path), "--norm", "linf", "--eps", "0.1"]
    code, text = _run(capsys, "evaluate", "--model", "small_cnn", "--weights", str(tmp_path / "w.pt"), *args)
    assert code == cli.EXIT_BAD_INPUT and "expected an existing .safetensors file" in text, text
    code, text = _run(
        capsys, "models", "register", "--model", "small_cnn", "--weights", "w.safetensors", "--name", "bad name", *args
    )
    assert code == cli.EXIT_BAD_INPUT and "--name" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_transfer_surrogate_for_other_images_is_refused_before_anything_starts(capsys, tmp_path, digits_path):
    """`--transfer-from` a model built for other images (3 channels here) or a folder that is no model:
    exit 2 naming the surrogate, before Ray starts and with no report written."""
    import ray

    from pipeline.config import ModelConfig
    from pipeline.model_folder import save_weights
    from pipeline.models import architecture, build_model

    target, surrogate = tmp_path / "target", tmp_path / "surrogate"
    for folder, shape in ((target, (1, 8, 8)), (surrogate, (3, 8, 8))):
        arch = architecture(ModelConfig(), shape=shape, num_classes=10, mean=(0.3,) * shape[0], std=(0.4,) * shape[0])
        save_weights(build_model(arch), arch, folder)
    ray_before = ray.is_initialized()
    base = ["evaluate", "--model", str(target), "--data", str(digits_path), "--norm", "linf", "--eps", "0.1"]
    code, text = _run(capsys, *base, "--transfer-from", str(surrogate), "--out", str(tmp_path / "out"))
    assert (
        code == cli.EXIT_BAD_INPUT
        and "--transfer-from" in text
        and "(3, 8, 8)" in text.replace("[3, 8, 8]", "(3, 8, 8)")
    ), text
    code, text = _run(capsys, *base, "--transfer-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_BAD_INPUT and "nothing" in text, text
    assert ray.is_initialized() == ray_before and not (tmp_path / "out").exists()


def test_more_gpu_workers_than_gpus_exit_2_before_anything_starts(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = torch.cuda.device_count() + 1  # one more than this machine has (none here)
    code, text = _train(capsys, tmp_path, "scaling.use_gpu=true", f"scaling.num_workers={workers}")
    assert code == cli.EXIT_BAD_INPUT, text
    assert "scaling.use_gpu" in text and f"needs {workers} GPUs" in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()
