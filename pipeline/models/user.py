"""Models from the user's own code: `model.name = "package.module:function"`, called with `model.kwargs`,
must return an nn.Module. Everything here is checked with a message that names the import path and says
what to change: a module that does not import, a missing function, a function that does not return a
module, outputs of the wrong shape.

The user's code travels with the model, never as a pickle: `code_location` is the package folder (or the
single .py file) to ship to Ray workers (runtime_env py_modules) and to log with a registered version
(MLflow code_paths); `import_shipped` imports a model's shipped copy to rebuild it elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ModelError

# package.module:function, Python identifiers only (the path is imported, so nothing else may pass).
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
# A module path inside a network, as named in its state_dict: `fc`, `classifier.5`, `head.proj`.
MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def is_import_path(name: str) -> bool:
    return IMPORT_PATH.fullmatch(name) is not None


def import_builder(path: str) -> Callable[..., Any]:
    """The function named by `package.module:function`, imported; a ModelError naming what failed."""
    if not is_import_path(path):
        raise ModelError(f"model.name {path!r}: expected a built-in name or an import path package.module:function")
    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ModelError(
            f"model.name {path!r}: module {module_name!r} cannot be imported ({err}); run from the folder that "
            "holds the package, put that folder on PYTHONPATH, or pip install the package"
        ) from None
    except Exception as err:  # the user's module may raise anything at import time
        raise ModelError(
            f"model.name {path!r}: importing module {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    builder = getattr(module, function_name, None)
    if builder is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:12]
        raise ModelError(
            f"model.name {path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
            f"{function_name!r}; its functions and classes: {', '.join(public) or 'none'}"
        )
    if not callable(builder):
        raise ModelError(f"model.name {path!r}: {function_name!r} is a {type(builder).__name__}, not a function")
    return builder


def build_user_network(path: str, kwargs: dict[str, Any]) -> nn.Module:
    """The user's function called with `kwargs`; its result must be an nn.Module."""
    builder = import_builder(path)
    try:
        network = builder(**kwargs)
    except Exception as err:  # wrong kwargs (TypeError) or the user's own failure
        raise ModelError(
            f"model.name {path!r} called with model.kwargs {kwargs!r} failed: {type(err).__name__}: {err}; "
            "check model.kwargs against the function's parameters"
        ) from None
    if not isinstance(network, nn.Module):
        raise ModelError(
            f"model.name {path!r} returned a {type(network).__name__}, not a torch.nn.Module; the function "
            "must build and return the network"
        )
    return network


class PickOutput(nn.Module):
    """The logits out of a network that returns a tuple/list (`index`: int) or a dict (`index`: key)."""

    def __init__(self, index: int | str) -> None:
        super().__init__()
        self.index = index

    def forward(self, outputs: Any) -> torch.Tensor:
        return outputs[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index!r}"


def check_outputs(model: nn.Module, *, shape: tuple[int, int, int], num_classes: int, name: str) -> None:
    """One forward pass of two [0,1] images: the model must return (2, num_classes) float logits."""
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # whatever the user's forward raises on these images
        raise ModelError(
            f"model {name!r} fails on a batch of images of shape {list(shape)} (the dataset's): "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, tuple | list | dict):
        kind = (
            "a dict with keys " + ", ".join(map(repr, list(out)[:8]))
            if isinstance(out, dict)
            else (f"a {type(out).__name__} of {len(out)}")
        )
        raise ModelError(
            f"model {name!r} returns {kind}, not a logits tensor; set model.output to the index or key that "
            "holds the logits"
        )
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) == (2, num_classes)):
        got = f"shape {list(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {name!r} returns {got} for 2 images; the dataset has {num_classes} classes, so it must "
            f"return float logits of shape [2, {num_classes}] (set model.reset_head to replace its final layer)"
        )


def located_code(path: str, base: Path) -> Path:
    """Import the user's `package.module:function` as the command line finds it (`base`, the folder the
    command runs in, first on sys.path, as `python -m` puts it) and return its code_location; a ModelError
    names a module that does not import or a missing function."""
    make_importable(base)
    import_builder(path)
    return code_location(path)


def code_location(path: str) -> Path:
    """What holds the code of `package.module:function`: the top-level package's folder, or the file of a
    top-level single-file module. Shipped whole, so the package's own relative imports keep working."""
    top = path.split(":")[0].split(".")[0]
    module = sys.modules.get(top) or importlib.import_module(top)
    if getattr(module, "__path__", None):  # a package (namespace packages have no __file__)
        locations = list(module.__path__)
        if len(locations) != 1:
            raise ModelError(f"model.name {path!r}: package {top!r} spans {len(locations)} folders; make it one")
        return Path(locations[0]).resolve()
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        raise ModelError(f"model.name {path!r}: module {top!r} is not Python source ({file}); it cannot be shipped")
    return Path(file).resolve()


# Where shipped code is unpacked or copied, one folder per content digest (a model folder may be a
# temporary download; a Ray worker or task has only what it was sent).
CODE_CACHE = Path(tempfile.gettempdir()) / "advtrain-code"
MAX_CODE_BYTES = 64 * 2**20
_SKIPPED = ("__pycache__", ".git", ".pytest_cache")


def _code_files(location: Path) -> list[tuple[str, Path]]:
    """(path inside the bundle, file) for a package folder or a single module file: sources only."""
    if location.is_file():
        return [(location.name, location)]
    files = []
    for file in sorted(location.rglob("*")):
        relative = file.relative_to(location.parent)
        if file.is_file() and file.suffix != ".pyc" and not set(relative.parts) & set(_SKIPPED):
            files.append((relative.as_posix(), file))
    return files


def pack_code(location: Path) -> dict[str, Any]:
    """The user's package (or module) as one zip in memory with its digest: sent to Ray workers and tasks,
    which have neither the user's folder nor a shared file system (`unpack_code`)."""
    buffer = io.BytesIO()
    digest = hashlib.sha256()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, file in _code_files(location):
            data = file.read_bytes()
            digest.update(name.encode() + b"\0" + data + b"\0")
            bundle.writestr(name, data)
    if buffer.tell() > MAX_CODE_BYTES:
        raise ModelError(
            f"{location}: the model's code is {buffer.tell() // 2**20} MiB zipped (over {MAX_CODE_BYTES // 2**20}); "
            "keep data and checkpoints out of the package that holds the model function"
        )
    return {"name": location.name, "sha256": digest.hexdigest(), "zip": buffer.getvalue()}


def unpack_code(bundle: dict[str, Any]) -> Path:
    """A bundle from `pack_code` unpacked once per content (CODE_CACHE/<digest>) and put on sys.path."""
    folder = CODE_CACHE / bundle["sha256"][:32]
    if not (folder / bundle["name"]).exists():
        CODE_CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CODE_CACHE))
        with zipfile.ZipFile(io.BytesIO(bundle["zip"])) as archive:
            for member in archive.namelist():  # our own bundle, but never write outside the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ModelError(f"code bundle {bundle['name']}: member {member!r} points outside its folder")
            archive.extractall(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process unpacked it first
            shutil.rmtree(staging, ignore_errors=True)
    make_importable(folder)
    return folder


def make_importable(folder: Path) -> None:
    """`folder` (holding the user's package or module, as MLflow's code/ does) first on sys.path, for the
    rest of the process: the package may import its own submodules later."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def import_shipped(path: str, code_folder: Path) -> None:
    """Import the module of `path` from the code shipped with a model (`code_folder`), refusing any module
    that is not that code: a model record names what to import, and must not reach code it did not ship
    (`os:system`). A module already imported from elsewhere passes when its file is byte for byte the
    shipped one (a process that trained the model and loads it back)."""
    module_name = path.split(":")[0]
    top = module_name.split(".")[0]
    if not ((code_folder / top).is_dir() or (code_folder / f"{top}.py").is_file()):
        raise ModelError(
            f"model {path!r}: its code ({top}) is not in the model's code folder {code_folder}; the version was "
            "registered without it: register it again with its code"
        )
    make_importable(code_folder)
    import_builder(path)
    file = Path(getattr(sys.modules[module_name], "__file__", "") or "").resolve()
    if file.is_relative_to(code_folder.resolve()):
        return
    top_file = Path(getattr(sys.modules[top], "__file__", "") or "").resolve()
    base = top_file.parent.parent if top_file.name == "__init__.py" else top_file.parent
    shipped = code_folder / file.relative_to(base) if file.is_relative_to(base) else None
    if shipped is None or not shipped.is_file() or shipped.read_bytes() != file.read_bytes():
        raise ModelError(
            f"model {path!r}: module {module_name!r} was imported from {file}, which is not the code shipped with "
            f"the model ({code_folder}); load the model in a fresh process, or one with the same code"
        )
