"""A model folder: weights as safetensors + an architecture JSON (no pickle), written by save_weights and
read back by load_weights with every check applied: the folder itself (and MLflow's `artifacts/` layout)
only, a strict architecture record, the weights' sha256 against the recorded one, and the weights'
names, shapes and dtypes against the architecture before any tensor is loaded. Every failure is a
ModelError naming the file. No mlflow here: pipeline.tracking.model_store logs and resolves folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data import sha256_file
from pipeline.errors import ModelError, WeightsChangedError
from pipeline.models import build_model, check_architecture, is_import_path, weights_fit_problems
from pipeline.models.pretrained import read_header
from pipeline.models.user import import_shipped, pack_code, unpack_code

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
# A user model's code, beside the architecture (a local folder) or one level up (MLflow's model layout,
# where code_paths land in code/ and the two files in artifacts/).
CODE_FOLDER = "code"
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".git")


def copy_code(code: Path, into: Path) -> None:
    """The user's package folder or single module file, copied into `into` (sources only)."""
    into.mkdir(parents=True, exist_ok=True)
    if code.is_dir():
        shutil.copytree(code, into / code.name, ignore=_IGNORED, dirs_exist_ok=True)
    else:
        shutil.copy2(code, into / code.name)


def shipped_code(arch_file: Path, arch: dict[str, Any]) -> Path | None:
    """For a user model: a lasting copy of its shipped code folder (the model folder may be a temporary
    download), keyed by the code's own digest; None for a built-in."""
    if not is_import_path(arch["name"]):
        return None
    for folder in (arch_file.parent / CODE_FOLDER, arch_file.parent.parent / CODE_FOLDER):
        source = folder / arch["code"]
        if source.exists():
            return unpack_code(pack_code(source))
    raise ModelError(
        f"{arch_file}: model {arch['name']!r} needs its code {arch['code']!r}, which is not in {CODE_FOLDER}/ "
        "beside it; the model was saved without its code: save or register it again"
    )


def save_weights(model: nn.Module, arch: dict[str, Any], folder: Path, *, code: Path | None = None) -> str:
    """Write model.safetensors + architecture.json to `folder` (and a user model's package or module,
    `code`, to folder/code/, MLflow's layout for code_paths); returns the weights' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    if code is not None:
        copy_code(code, folder / CODE_FOLDER)
    # contiguous: safetensors stores dense row-major tensors only, and conv weights are channels_last.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    digest = sha256_file(folder / WEIGHTS_FILE)
    (folder / ARCH_FILE).write_text(json.dumps({**arch, "weights_sha256": digest}, indent=2))
    return digest


# A model folder: these two files, in the folder itself or in the subfolder where MLflow keeps a logged
# pyfunc's artifacts (what `mlflow artifacts download` / download_artifacts give). Nowhere else: a
# recursive search of a folder like / would walk the whole disk and load the first match.
MODEL_SUBFOLDERS = (".", "artifacts")
MAX_ARCH_BYTES = 64 * 1024  # an architecture record is a few hundred bytes


def load_folder(folder: str | Path, *, expected_sha256: str | None = None) -> tuple[nn.Module, str, dict]:
    arch_file, weights = model_files(Path(folder))
    arch = _read_architecture(arch_file)
    digest = _verified_sha256(weights, arch_file, arch, expected_sha256)
    code = shipped_code(arch_file, arch)
    if code is not None:
        import_shipped(arch["name"], code)
    model = _build_with_weights(arch, arch_file, weights)
    return model.eval(), digest, arch


def model_files(folder: Path) -> tuple[Path, Path]:
    """(architecture.json, model.safetensors) of a model folder, looked up only where they belong."""
    kind = _path_kind(folder)
    if kind != "folder":
        raise ModelError(
            f"{folder}: {'a file, not a folder' if kind == 'file' else 'no such folder'}; a model is a folder "
            f"with {ARCH_FILE} and {WEIGHTS_FILE}, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model"
        )
    found = []
    for sub in MODEL_SUBFOLDERS:
        arch_file, weights = folder / sub / ARCH_FILE, folder / sub / WEIGHTS_FILE
        if arch_file.is_file() and weights.is_file():
            return arch_file, weights
        found += [str(f.relative_to(folder)) for f in (arch_file, weights) if f.is_file()]
    expected = " or ".join(f"{folder / sub}/{{{ARCH_FILE},{WEIGHTS_FILE}}}" for sub in MODEL_SUBFOLDERS)
    raise ModelError(
        f"{folder}: not an advtrain model folder: expected {expected} (found {', '.join(found) or 'neither'}); "
        "pass the folder that save_weights wrote or that MLflow downloaded"
    )


def _path_kind(path: Path) -> str:
    try:
        return "folder" if path.is_dir() else "file" if path.exists() else "missing"
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return "missing"


def _read_architecture(arch_file: Path) -> dict[str, Any]:
    """architecture.json parsed strictly (UTF-8, plain JSON, no NaN, no repeated keys) and checked."""
    try:
        with open(arch_file, "rb") as f:
            raw = f.read(MAX_ARCH_BYTES + 1)
    except OSError as err:
        raise ModelError(f"{arch_file}: cannot be read ({err.strerror}); check its permissions") from None
    if len(raw) > MAX_ARCH_BYTES:
        raise ModelError(f"{arch_file}: over {MAX_ARCH_BYTES} bytes; an architecture is a few hundred: wrong file?")
    try:
        text = raw.decode("utf-8")
        arch = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeated_keys)
    except UnicodeDecodeError as err:
        raise ModelError(
            f"{arch_file}: not UTF-8 text (byte {err.start}); re-save the model with save_weights"
        ) from None
    except RecursionError:
        raise ModelError(f"{arch_file}: JSON nested too deeply; an architecture is one flat object") from None
    except ValueError as err:  # json.JSONDecodeError, our hooks, integers over Python's digit limit
        raise ModelError(f"{arch_file}: not valid JSON ({err}); fix the file or re-save the model") from None
    try:
        return check_architecture(arch)
    except ModelError as err:
        raise ModelError(f"{arch_file}: {err}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0][:40]!r} appears more than once")
    return dict(pairs)


def _verified_sha256(weights: Path, arch_file: Path, arch: dict[str, Any], expected: str | None) -> str:
    """The weights' sha256 after checking it against `expected` (the registry's tag) or, for a local
    folder, the digest save_weights recorded: never load weights that nothing vouches for."""
    expected = expected or arch.get("weights_sha256")
    if not expected:
        raise ModelError(
            f"{arch_file}: no 'weights_sha256' key, so {weights.name} cannot be verified and is not loaded; "
            "re-save the model with save_weights (it records the digest), or, if you trust the file, add "
            f'"weights_sha256": "<sha256sum of {weights.name}>"'
        )
    digest = sha256_file(weights)
    if digest != expected:
        raise WeightsChangedError(
            f"{weights}: sha256 {digest[:16]}... does not match the recorded {str(expected)[:16]}...; "
            "the weights changed after they were saved or registered: refusing to load them. Restore the "
            "original file, or re-save and re-register the model"
        )
    return digest


def _build_with_weights(arch: dict[str, Any], arch_file: Path, weights: Path) -> nn.Module:
    """The network with its weights; the file's tensors are checked against a skeleton on the meta device
    first, so a mismatch costs no memory and reports every key at once (load_state_dict stops at one)."""
    header = read_header(weights)
    with torch.device("meta"):
        skeleton = _build(arch, arch_file)
    _check_weights_fit(skeleton.state_dict(), header, weights, arch_file)
    model = _build(arch, arch_file)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{weights}: cannot be read as safetensors ({err}); re-save the model") from None
    model.load_state_dict(state)
    return model


def _build(arch: dict[str, Any], arch_file: Path) -> nn.Module:
    try:
        return build_model(arch)
    except ValueError as err:  # the per-architecture rules: wide_resnet's depth 6n+4, small_cnn's side
        raise ModelError(f"{arch_file}: {err}") from None


def _check_weights_fit(
    state: dict[str, torch.Tensor], header: dict[str, tuple[str, list[int]]], weights: Path, arch_file: Path
) -> None:
    problems = weights_fit_problems(state, header)
    if problems:
        raise ModelError(
            f"{weights}: the weights do not fit the architecture in {arch_file}: {'; '.join(problems)}. "
            "Keep the weights and architecture.json that save_weights wrote together"
        )


def load_weights(folder: str | Path, *, expected_sha256: str | None = None) -> nn.Module:
    """Rebuild the network from a folder with architecture.json + model.safetensors (no unpickling).

    Verifies the weights' sha256 against `expected_sha256` (e.g. the registry tag) or, failing that,
    the one recorded in architecture.json, and refuses weights with neither. Returns the model in eval mode
    on CPU; a ModelError (the file, the key, what to change) for anything that cannot be loaded.
    """
    return load_folder(folder, expected_sha256=expected_sha256)[0]
