"""Hostile and broken model folders: every one is refused with a ModelError (an InputError: CLI exit code
2) that names the file, the key or value, and what to change; never a raw KeyError/TypeError/JSON/
safetensors/torch traceback. Valid folders are built with save_weights, then broken by code."""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.data import sha256_file
from pipeline.errors import InputError, ModelError, TrackingError, WeightsChangedError
from pipeline.model_folder import ARCH_FILE, WEIGHTS_FILE, load_weights, save_weights
from pipeline.models import build_model
from pipeline.tracking.model_store import load_model, resolve_model

# small_cnn on 8x8x1 digits: the cheapest real model (about 0.2M parameters).
ARCH = {
    "name": "small_cnn",
    "width": 1,
    "depth": 16,
    "activation": "relu",
    "shape": [1, 8, 8],
    "num_classes": 10,
    "mean": [0.3],
    "std": [0.4],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A valid model folder, as save_weights writes it."""
    torch.manual_seed(0)
    save_weights(build_model(ARCH), ARCH, tmp_path / "model")
    return tmp_path / "model"


def read_arch(folder: Path) -> dict:
    return json.loads((folder / ARCH_FILE).read_text())


def write_arch(folder: Path, arch: object) -> None:
    (folder / ARCH_FILE).write_text(json.dumps(arch))


def reseal(folder: Path) -> None:
    """Record the current weights' digest, as a careless or hostile writer would after changing them."""
    write_arch(folder, {**read_arch(folder), "weights_sha256": sha256_file(folder / WEIGHTS_FILE)})


def refused(folder: Path | str, match: str) -> ModelError:
    with pytest.raises(ModelError, match=match) as info:
        load_model(str(folder))
    return info.value


class TestFolderLayout:
    def test_valid_folder_round_trips(self, folder):
        resolved = resolve_model(str(folder))
        x = torch.rand(4, 1, 8, 8)
        reference = build_model(ARCH)
        reference.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        assert resolved.model.training is False
        assert torch.equal(resolved.model(x), reference.eval()(x))
        assert resolved.weights_sha256 == read_arch(folder)["weights_sha256"]
        assert resolved.architecture == read_arch(folder)

    def test_batchnorm_counters_round_trip(self, tmp_path):
        # wide_resnet holds int64 BatchNorm counters beside the float32 weights; both must fit.
        arch = {**ARCH, "name": "wide_resnet", "depth": 10}
        save_weights(build_model(arch).train(), arch, tmp_path)
        assert load_model(str(tmp_path))[1].bn.num_batches_tracked.dtype == torch.int64

    def test_mlflow_artifacts_layout_loads(self, folder):
        # What MLflow downloads for a logged pyfunc: MLmodel beside artifacts/{architecture.json,...}.
        (folder / "artifacts").mkdir()
        for name in (ARCH_FILE, WEIGHTS_FILE):
            (folder / name).rename(folder / "artifacts" / name)
        assert load_model(str(folder)).training is False

    def test_deeper_folders_are_not_searched(self, folder, tmp_path):
        deep = tmp_path / "outer" / "a" / "b"
        deep.mkdir(parents=True)
        for name in (ARCH_FILE, WEIGHTS_FILE):
            (folder / name).rename(deep / name)
        error = refused(tmp_path / "outer", "not an advtrain model folder")
        assert ARCH_FILE in str(error) and "artifacts" in str(error) and "found neither" in str(error)

    def test_root_is_not_walked(self):
        started = time.perf_counter()
        refused("/", "not an advtrain model folder")
        assert time.perf_counter() - started < 10.0  # walking / would take minutes

    def test_half_a_model_says_what_was_found(self, folder):
        (folder / WEIGHTS_FILE).unlink()
        error = refused(folder, f"found {ARCH_FILE}")
        assert str(folder) in str(error) and WEIGHTS_FILE in str(error)

    def test_a_file_is_not_a_folder(self, folder):
        refused(folder / WEIGHTS_FILE, "a file, not a folder; a model is a folder with architecture.json and")

    @pytest.mark.parametrize("uri", ["./no-such-model", "s3://bucket/model", "x" * 5000], ids=["typo", "s3", "long"])
    def test_what_is_neither_a_folder_nor_a_model_uri(self, tmp_path, monkeypatch, uri):
        monkeypatch.chdir(tmp_path)
        refused(uri, "no such folder; .*or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model")
        assert list(tmp_path.iterdir()) == []  # no ./mlruns tracking store created on the way

    def test_a_folder_named_like_the_file_is_not_the_file(self, folder):
        (folder / ARCH_FILE).unlink()
        (folder / ARCH_FILE).mkdir()
        refused(folder, "not an advtrain model folder")


BAD_VALUES = [
    ("num_classes", "10", "key 'num_classes' is '10' \\(a string\\); expected an integer from 2"),
    ("num_classes", None, "key 'num_classes' is None \\(null\\)"),
    ("num_classes", -1, "key 'num_classes' is -1"),
    ("num_classes", 10**30, "key 'num_classes'.*expected an integer from 2 to 100000"),
    ("width", True, "key 'width' is True \\(a boolean\\)"),
    ("width", 1.5, "key 'width' is 1.5 \\(a number\\)"),
    ("width", 10**9, "key 'width'.*from 1 to 64"),
    ("depth", [16], "key 'depth' is \\[16\\] \\(a list\\)"),
    ("shape", [8, 8], "key 'shape' is \\[8, 8\\].*expected \\[channels, height, width\\]"),
    ("shape", None, "key 'shape' is None"),
    ("shape", [1, 8, 10**7], "key 'shape'.*height and width 1-4096"),
    ("shape", {"c": 1}, "key 'shape'.*\\(an object\\)"),
    ("mean", ["0.3"], "key 'mean'.*expected a list of 1 finite number"),
    ("mean", [0.3, 0.3], "key 'mean'.*one per image channel \\(shape\\[0\\] is 1\\)"),
    ("std", [0], "key 'std'.*finite number\\(s\\) > 0"),
    ("name", 7, "key 'name' is 7.*expected one of small_cnn"),
    ("activation", "swish", "key 'activation' is 'swish'.*expected one of relu, silu, gelu"),
    ("weights_sha256", "abc", "key 'weights_sha256' is 'abc'.*64 lowercase hex"),
]


class TestArchitectureJson:
    @pytest.mark.parametrize("key", ["name", "width", "depth", "shape", "num_classes", "mean", "std"])
    def test_missing_key_is_named(self, folder, key):
        write_arch(folder, {k: v for k, v in read_arch(folder).items() if k != key})
        error = refused(folder, f"missing key\\(s\\) '{key}'")
        assert str(folder / ARCH_FILE) in str(error)

    @pytest.mark.parametrize(("key", "value", "match"), BAD_VALUES, ids=[f"{k}={v!r}"[:30] for k, v, _ in BAD_VALUES])
    def test_wrong_value_is_named(self, folder, key, value, match):
        write_arch(folder, {**read_arch(folder), key: value})
        error = refused(folder, match)
        assert str(error).startswith(str(folder / ARCH_FILE))

    def test_overflowing_numbers_are_not_finite(self, folder):
        text = json.dumps({**read_arch(folder), "std": [0.0]}).replace("[0.0]", "[1e400]")
        (folder / ARCH_FILE).write_text(text)  # Python reads 1e400 as inf
        refused(folder, "key 'std' is \\[inf\\].*finite number")

    def test_unknown_model_name_suggests_the_registered_ones(self, folder):
        write_arch(folder, {**read_arch(folder), "name": "small_cnm"})
        refused(folder, "key 'name'.*Did you mean 'small_cnn'\\?.*Allowed: small_cnn, preact_resnet18, wide_resnet")

    def test_unknown_key_is_named(self, folder):
        write_arch(folder, {**read_arch(folder), "widht": 2})
        refused(folder, "unknown key 'widht'; an architecture has only the keys name, width")

    def test_architecture_rules_are_checked_with_the_file_named(self, folder):
        valid = read_arch(folder)
        write_arch(folder, {**valid, "name": "wide_resnet", "depth": 17})
        refused(folder, f"{ARCH_FILE}: model.depth must be 6n\\+4")
        write_arch(folder, {**valid, "shape": [1, 8, 6]})
        refused(folder, "small_cnn needs square images")

    def test_not_an_object(self, folder):
        write_arch(folder, [ARCH])
        refused(folder, "expected a JSON object with the keys name, width")

    @pytest.mark.parametrize(
        ("raw", "match"),
        [
            (b'{"name": "small_\xff\xfe"}', "not UTF-8 text \\(byte 16\\)"),
            (b'{"name": "small_cnn", "width": ', "not valid JSON"),
            (b"", "not valid JSON"),
            (b'{"width": NaN}', "not valid JSON \\(NaN is not a JSON number\\)"),
            (b'{"std": [-Infinity]}', "not valid JSON \\(-Infinity is not a JSON number\\)"),
            (b'{"width": 1, "width": 2}', "key 'width' appears more than once"),
            (b'{"width": ' + b"9" * 5000 + b"}", "not valid JSON"),  # over Python's int digit limit
            (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
            (b'{"name": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "nested too deeply"),
            (b" " * 70_000 + b"{}", "over 65536 bytes"),
        ],
        ids=[
            "non-utf8",
            "truncated",
            "empty",
            "nan",
            "infinity",
            "repeated-key",
            "huge-int",
            "deep",
            "deep-in-key",
            "huge",
        ],
    )
    def test_unparseable_files(self, folder, raw, match):
        (folder / ARCH_FILE).write_bytes(raw)
        error = refused(folder, match)
        assert str(error).startswith(str(folder / ARCH_FILE))

    def test_models_saved_before_activation_existed_still_load(self, folder):
        write_arch(folder, {k: v for k, v in read_arch(folder).items() if k != "activation"})
        assert isinstance(load_model(str(folder))[1].features[1], torch.nn.ReLU)


class TestChecksums:
    def test_folder_without_a_recorded_digest_is_refused(self, folder):
        write_arch(folder, {k: v for k, v in read_arch(folder).items() if k != "weights_sha256"})
        error = refused(folder, "no 'weights_sha256' key, so model.safetensors cannot be verified")
        assert "save_weights" in str(error)

    def test_changed_weights_are_refused(self, folder):
        raw = bytearray((folder / WEIGHTS_FILE).read_bytes())
        raw[-5] ^= 0x01
        (folder / WEIGHTS_FILE).write_bytes(bytes(raw))
        error = refused(folder, "does not match the recorded")
        # Callers of the registry catch TrackingError for this; it stays one.
        assert isinstance(error, WeightsChangedError) and isinstance(error, TrackingError)

    def test_another_recorded_digest_is_refused(self, folder):
        write_arch(folder, {**read_arch(folder), "weights_sha256": "0" * 64})
        refused(folder, f"{WEIGHTS_FILE}: sha256 .* does not match the recorded 0000000000000000")

    def test_the_registry_digest_wins_over_the_recorded_one(self, folder):
        with pytest.raises(WeightsChangedError, match="does not match the recorded abababab"):
            load_weights(folder, expected_sha256="ab" * 32)


class TestWeightsFile:
    @pytest.mark.parametrize("keep", [0, 7, 100, -1000], ids=["empty", "7-bytes", "header-cut", "data-cut"])
    def test_truncated_weights_are_refused(self, folder, keep):
        raw = (folder / WEIGHTS_FILE).read_bytes()
        (folder / WEIGHTS_FILE).write_bytes(raw[:keep])
        reseal(folder)
        error = refused(folder, "not a readable safetensors file .*truncated or corrupt")
        assert str(error).startswith(str(folder / WEIGHTS_FILE))

    def test_garbage_header_is_refused(self, folder):
        raw = (folder / WEIGHTS_FILE).read_bytes()
        (folder / WEIGHTS_FILE).write_bytes(raw[:8] + b"{not json" + raw[17:])
        reseal(folder)
        refused(folder, "not a readable safetensors file")

    def test_weights_of_another_architecture_list_the_mismatches(self, folder):
        save_weights(build_model({**ARCH, "num_classes": 5}), {**ARCH, "num_classes": 5}, folder)
        write_arch(folder, {**ARCH, "weights_sha256": read_arch(folder)["weights_sha256"]})
        error = refused(folder, "the weights do not fit the architecture in .*architecture.json")
        assert (
            "shape/dtype mismatches (2): 1.classifier.5.bias (file F32[5], model F32[10]), "
            "1.classifier.5.weight (file F32[5, 200], model F32[10, 200])"
        ) in str(error)
        assert "missing keys" not in str(error) and "unexpected keys" not in str(error)

    def test_missing_and_unexpected_keys_are_listed(self, folder):
        state = load_file(str(folder / WEIGHTS_FILE))
        kept = {k: v for k, v in state.items() if not k.startswith("1.features")}
        save_file({**kept, "extra.weight": torch.zeros(2)}, str(folder / WEIGHTS_FILE))
        reseal(folder)
        error = str(refused(folder, "do not fit"))
        assert "missing keys (8): 1.features.0.weight, 1.features.0.bias," in error
        assert ", ...; unexpected keys (1): extra.weight" in error  # the first 5 of the 8, then "..."

    def test_other_dtypes_are_refused(self, folder):
        state = load_file(str(folder / WEIGHTS_FILE))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(folder / WEIGHTS_FILE))
        reseal(folder)
        refused(
            folder,
            "shape/dtype mismatches \\(\\d+\\): 0.mean \\(file F16\\[1, 1, 1, 1\\], model F32\\[1, 1, 1, 1\\]\\)",
        )


# ---------------------------------------------------------------------------------------------- fuzz
JUNK = [None, True, -1, 0, 2**70, -(2**63), 1e308, -1e-308, 3.5, "", "10", "x" * 300, [], {}, [[[[1]]]], {"a": {}}]
OTHER_VALID = {
    "name": ["preact_resnet18", "wide_resnet"],
    "width": [2, 3],
    "depth": [10, 17, 28],
    "shape": [[3, 8, 8], [1, 16, 16], [1, 8, 12]],
    "num_classes": [2, 11],
}
NUM_ARCH_MUTATIONS = 400
NUM_HEADER_MUTATIONS = 100


def mutate_arch(rng: random.Random, arch: dict) -> bytes:
    """One or two random edits of a valid architecture record, as the bytes of the file."""
    arch = json.loads(json.dumps(arch))
    for _ in range(rng.randint(1, 2)):
        key = rng.choice([*arch, "extra"]) if arch else "name"
        op = rng.choice(["delete", "junk", "number", "nest", "element", "other"])
        if op == "delete":
            arch.pop(key, None)
        elif op == "junk":
            arch[key] = rng.choice(JUNK)
        elif op == "number":
            huge, small = 10 ** rng.randint(1, 40), rng.randint(1, 20)  # small: may fit the schema, not the weights
            arch[key] = rng.choice([float("nan"), float("inf"), -5, huge, rng.uniform(-9, 9), small])
        elif op == "nest":
            arch[key] = {"v": arch.get(key)} if rng.random() < 0.5 else [arch.get(key)] * rng.randint(0, 4)
        elif op == "other" and key in OTHER_VALID:  # valid JSON, another network: must not fit the weights
            arch[key] = rng.choice(OTHER_VALID[key])
        elif isinstance(arch.get(key), list) and arch[key]:
            arch[key][rng.randrange(len(arch[key]))] = rng.choice([*JUNK, 1, 4, 8, 16])
    raw = json.dumps(arch).encode()  # NaN/Infinity are written as the (invalid JSON) bare words
    return mutate_bytes(rng, raw) if rng.random() < 0.3 else raw


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    raw = bytearray(raw)
    op = rng.choice(["flip", "truncate", "insert"])
    if op == "truncate":
        return bytes(raw[: rng.randrange(len(raw) + 1)])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(raw))
        if op == "flip":
            raw[at] ^= 1 << rng.randrange(8)
        else:
            raw[at:at] = bytes([rng.randrange(256)])
    return bytes(raw)


def test_fuzzed_architecture_files_raise_only_input_errors(folder):
    rng, valid = random.Random(1234), read_arch(folder)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(NUM_ARCH_MUTATIONS):
        (folder / ARCH_FILE).write_bytes(mutate_arch(rng, valid))
        try:
            load_model(str(folder))
            outcomes["loaded"] += 1
        except InputError:  # anything else fails the test with its traceback
            outcomes["refused"] += 1
    assert outcomes["refused"] > NUM_ARCH_MUTATIONS // 2, outcomes


def test_fuzzed_weights_headers_raise_only_input_errors(folder):
    rng, valid = random.Random(5678), (folder / WEIGHTS_FILE).read_bytes()
    header_end = 8 + int.from_bytes(valid[:8], "little")
    for _ in range(NUM_HEADER_MUTATIONS):
        (folder / WEIGHTS_FILE).write_bytes(mutate_bytes(rng, valid[:header_end]) + valid[header_end:])
        reseal(folder)
        with contextlib.suppress(InputError):  # anything else fails the test with its traceback
            load_model(str(folder))
