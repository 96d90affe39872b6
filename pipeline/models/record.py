"""The architecture record: a small JSON-able dict, stored beside the safetensors weights, from which
`build_model` rebuilds the network without unpickling anything.

Two kinds, told apart by `name`: a built-in architecture (name, width, depth, activation, shape,
num_classes, mean, std) or the user's `package.module:function` (name, kwargs, shape, num_classes,
normalize, output, code: the package or module shipped with the model). Either may carry `reset_head`
(the final linear layer replaced for num_classes) and, once saved, `weights_sha256`.
architecture.json may come from anywhere (a folder named on the command line, a download), so
`check_architecture` checks it key by key before anything is built. The bounds are generous for every
network here and keep a hostile file from asking for a network that takes minutes or all memory to build.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig, registered_name
from pipeline.data.metadata import MAX_CHANNELS, MAX_CLASSES, MAX_SIDE
from pipeline.errors import ModelError
from pipeline.models.builtin import ACTIVATIONS, MODELS, Normalize
from pipeline.models.user import MODULE_PATH, PickOutput, build_user_network, is_import_path


def architecture(
    config: ModelConfig,
    *,
    shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    code: str = "",
) -> dict[str, Any]:
    """Everything needed to rebuild the network (stored beside the weights; no pickle). `mean`/`std` are
    the dataset's, used by built-ins unless model.normalize is set; `code` names the user's shipped
    package or module (pipeline.models.user.code_location's name)."""
    normalize = config.normalize.model_dump() if config.normalize.mean else None
    common = {"shape": list(shape), "num_classes": num_classes, "reset_head": config.reset_head}
    if config.name in MODELS:
        stats = normalize or {"mean": list(mean), "std": list(std)}
        return {
            "name": config.name,
            "width": config.width,
            "depth": config.depth,
            "activation": config.activation,
            **common,
            "mean": list(stats["mean"]),
            "std": list(stats["std"]),
        }
    output = config.output if config.output != "" else None
    return {
        "name": config.name,
        "kwargs": dict(config.kwargs),
        **common,
        "normalize": normalize,
        "output": output,
        "code": code,
    }


def build_model(arch: dict[str, Any]) -> nn.Module:
    """nn.Sequential(Normalize, network[, PickOutput]) from an `architecture` dict. Built-ins get
    channels_last weights; a user network keeps the memory format it was built with."""
    if arch["name"] in MODELS:
        return _build_builtin(arch)
    network = build_user_network(arch["name"], arch["kwargs"])
    _replace_head(network, arch.get("reset_head", ""), arch["num_classes"])
    norm = arch["normalize"]
    first = Normalize(tuple(norm["mean"]), tuple(norm["std"])) if norm else nn.Identity()
    # Identity holds no state, so the network's weights are "1.*" with or without normalisation.
    parts = [first, network] + ([PickOutput(arch["output"])] if arch.get("output") is not None else [])
    return nn.Sequential(*parts)


def _build_builtin(arch: dict[str, Any]) -> nn.Module:
    c, h, w = arch["shape"]
    name, num_classes, width = arch["name"], arch["num_classes"], arch.get("width", 1)
    activation = arch.get("activation", "relu")  # models registered before the option were all ReLU
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown model activation '{activation}'; allowed: {', '.join(ACTIVATIONS)}")
    if len(arch["mean"]) != c or len(arch["std"]) != c:
        raise ValueError(f"mean/std need {c} channel values, got {arch['mean']} / {arch['std']}")
    net = MODELS[name](
        c, h, w, num_classes=num_classes, width=width, depth=arch.get("depth", 28), activation=activation
    )
    _replace_head(net, arch.get("reset_head", ""), num_classes)
    model = nn.Sequential(Normalize(tuple(arch["mean"]), tuple(arch["std"])), net)
    # channels_last (NHWC) conv weights make every conv run in NHWC, inputs included: oneDNN's and
    # cuDNN's fast conv path (and the one tensor cores want under autocast). Measured here on CPU:
    # small_cnn PGD-3 training steps 1.21x faster, Square's forward passes 1.56x, preact_resnet18
    # steps 1.01x (benchmarks/memory_format.py, RESULTS.md).
    # Values are unchanged (same maths, another summation order); `.to(device)` keeps the format,
    # and saved weights are made contiguous (pipeline.model_folder.save_weights). Not for user networks:
    # their code may `.view` an NHWC activation, which fails.
    return model.to(memory_format=torch.channels_last)


def input_memory_format(model: nn.Module | Callable) -> torch.memory_format:
    """The memory format inputs should have for `model`: channels_last when its first conv weight is
    stored channels_last (the built-ins). An NCHW input to NHWC weights is converted by every forward,
    every attack step's included; converting each batch once saves that. A plain function: NCHW."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    for module in modules:
        if isinstance(module, nn.Conv2d):
            weight = module.weight
            nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


def _replace_head(network: nn.Module, path: str, num_classes: int) -> None:
    """model.reset_head: the nn.Linear at `path` (a module path in the network) replaced by a freshly
    initialised one with `num_classes` outputs, for fine-tuning on a new set of classes."""
    if not path:
        return
    try:
        head = network.get_submodule(path)
    except AttributeError:
        names = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
        raise ModelError(
            f"model.reset_head {path!r}: no such module in the network; its linear layers: {', '.join(names) or 'none'}"
        ) from None
    if not isinstance(head, nn.Linear):
        raise ModelError(f"model.reset_head {path!r} is a {type(head).__name__}; it must name an nn.Linear")
    parent_path, _, leaf = path.rpartition(".")
    parent = network.get_submodule(parent_path) if parent_path else network
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    setattr(parent, leaf, new.to(device=head.weight.device, dtype=head.weight.dtype))


def head_parameter_names(arch: dict[str, Any]) -> set[str]:
    """Names (in the built model's state_dict) of the reset head's parameters; empty without reset_head."""
    path = arch.get("reset_head", "")
    return {f"1.{path}.weight", f"1.{path}.bias"} if path else set()


# ------------------------------------------------------------------ a stored architecture, checked
BUILTIN_KEYS = ("name", "width", "depth", "activation", "shape", "num_classes", "mean", "std")
USER_KEYS = ("name", "kwargs", "shape", "num_classes", "normalize", "output", "code")
# Models saved before `activation` existed lack it (built as ReLU); the digest is absent before saving;
# reset_head came with fine-tuning.
_OPTIONAL_KEYS = ("activation", "weights_sha256", "reset_head")
ARCH_KEYS = tuple(dict.fromkeys(BUILTIN_KEYS + USER_KEYS + _OPTIONAL_KEYS))
_INT_BOUNDS = {"width": (1, 64), "depth": (10, 1000), "num_classes": (2, MAX_CLASSES)}
MAX_KWARGS_JSON = 16 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.py)?")
_JSON_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}
# Values are shown short and shallow: a hostile value may be long or deeply nested.
_short = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong = 2, 40, 40, 40
_short.maxlist, _short.maxdict = 4, 3


def _show(value: object) -> str:
    kind = "null" if value is None else _JSON_KINDS.get(type(value), "an object")
    return f"{_short.repr(value)} ({kind})"


def check_architecture(arch: object) -> dict[str, Any]:
    """`arch` itself if it is a complete architecture record (as `architecture` writes it, plus an optional
    weights_sha256) with values in range, else a ModelError naming the key and what it must be. Builds
    nothing; the per-architecture rules (wide_resnet's 6n+4, ...) are checked by `build_model`."""
    if not isinstance(arch, dict):
        raise ModelError(f"expected a JSON object with the keys {', '.join(BUILTIN_KEYS)}; got {_show(arch)}")
    user = isinstance(arch.get("name"), str) and is_import_path(arch["name"])
    _check_keys(arch, USER_KEYS if user else BUILTIN_KEYS)
    if user:
        _check_user(arch)
    else:
        _check_name(arch["name"])
        for key in ("width", "depth"):
            _check_int(arch, key)
    _check_int(arch, "num_classes")
    channels = _check_shape(arch["shape"])
    if user:
        _check_normalize(arch["normalize"], channels)
    else:
        _check_per_channel("mean", arch["mean"], channels, positive=False)
        _check_per_channel("std", arch["std"], channels, positive=True)
    _check_optional(arch)
    return arch


def _check_int(arch: dict, key: str) -> None:
    low, high = _INT_BOUNDS[key]
    if type(arch[key]) is not int or not low <= arch[key] <= high:  # type(): true is an int in Python
        raise ModelError(f"key '{key}' is {_show(arch[key])}; expected an integer from {low} to {high}")


def _check_optional(arch: dict) -> None:
    if "activation" in arch and not (isinstance(arch["activation"], str) and arch["activation"] in ACTIVATIONS):
        raise ModelError(
            f"key 'activation' is {_show(arch['activation'])}; expected one of {', '.join(ACTIVATIONS)} "
            "(or no key: ReLU)"
        )
    head = arch.get("reset_head", "")
    if not (isinstance(head, str) and (head == "" or (len(head) <= 200 and MODULE_PATH.fullmatch(head)))):
        raise ModelError(f'key \'reset_head\' is {_show(head)}; expected "" or a module path such as "fc"')
    sha = arch.get("weights_sha256", "")
    if "weights_sha256" in arch and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise ModelError(f"key 'weights_sha256' is {_show(sha)}; expected 64 lowercase hex digits (a sha256)")


def _check_user(arch: dict) -> None:
    kwargs, output, code = arch["kwargs"], arch["output"], arch["code"]
    if not isinstance(kwargs, dict) or len(json.dumps(kwargs)) > MAX_KWARGS_JSON:
        raise ModelError(f"key 'kwargs' is {_show(kwargs)}; expected a JSON object under {MAX_KWARGS_JSON} bytes")
    if not (
        output is None
        or (type(output) is int and 0 <= output < 1000)
        or (isinstance(output, str) and 0 < len(output) <= 128)
    ):
        raise ModelError(f"key 'output' is {_show(output)}; expected null, an index 0-999 or a key (a string)")
    if not (isinstance(code, str) and len(code) <= 128 and _CODE_NAME.fullmatch(code)):
        raise ModelError(f"key 'code' is {_show(code)}; expected the shipped package or module name, e.g. \"mynets\"")


def _check_normalize(normalize: object, channels: int) -> None:
    if normalize is None:
        return
    if not (isinstance(normalize, dict) and sorted(normalize) == ["mean", "std"]):
        raise ModelError(f"key 'normalize' is {_show(normalize)}; expected null or an object with mean and std")
    _check_per_channel("normalize.mean", normalize["mean"], channels, positive=False)
    _check_per_channel("normalize.std", normalize["std"], channels, positive=True)


def _check_keys(arch: dict, required: tuple[str, ...]) -> None:
    allowed = tuple(dict.fromkeys(required + _OPTIONAL_KEYS))
    unknown = [key for key in arch if key not in allowed]
    if unknown:
        raise ModelError(
            f"unknown key {_short.repr(unknown[0])}"
            + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
            + f"; an architecture has only the keys {', '.join(allowed)}: remove or rename it"
        )
    missing = [key for key in required if key not in arch and key not in _OPTIONAL_KEYS]
    if missing:
        raise ModelError(
            f"missing key(s) {', '.join(repr(key) for key in missing)}; an architecture needs "
            f"{', '.join(k for k in required if k not in _OPTIONAL_KEYS)} (as pipeline.models.architecture writes)"
        )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or len(name) > 64:
        raise ModelError(f"key 'name' is {_show(name)}; expected one of {', '.join(MODELS)} or package.module:function")
    try:
        registered_name(name, MODELS, "model")
    except ValueError as err:
        raise ModelError(f"key 'name': {err} (or an import path package.module:function)") from None


def _check_shape(shape: object) -> int:
    """The number of channels of a valid [channels, height, width] list."""
    bounds = ((1, MAX_CHANNELS), (1, MAX_SIDE), (1, MAX_SIDE))
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(type(n) is int and low <= n <= high for n, (low, high) in zip(shape, bounds, strict=True))
    ):
        raise ModelError(
            f"key 'shape' is {_show(shape)}; expected [channels, height, width]: 3 integers, channels "
            f"1-{MAX_CHANNELS}, height and width 1-{MAX_SIDE} (e.g. [1, 8, 8])"
        )
    return shape[0]


def _check_per_channel(key: str, values: object, channels: int, *, positive: bool) -> None:
    def ok(v: object) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and (v > 0 if positive else True)

    if not (isinstance(values, list) and len(values) == channels and all(ok(v) for v in values)):
        raise ModelError(
            f"key '{key}' is {_show(values)}; expected a list of {channels} finite number(s)"
            + (" > 0" if positive else "")
            + f", one per image channel (shape[0] is {channels})"
        )
