"""Architectures, built by name. Normalisation is the first layer, so inputs are pixels in [0,1].

Written here rather than taken from torchvision (whose PyPI build does not import beside this torch).
An architecture is fully described by a small JSON-able dict (`architecture`) that is stored beside the
safetensors weights, so a registered model loads without unpickling any code.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig, registered_name
from pipeline.data.metadata import MAX_CHANNELS, MAX_CLASSES, MAX_SIDE
from pipeline.errors import ModelError


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they travel with the weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Smooth activations (Xie et al. 2020, "Smooth Adversarial Training") give the attacks better gradients
# during training at no extra cost; they helped ResNets there. They hold no parameters, so the weights are
# the same for every choice. Measured here, FGSM-RS on Fashion-MNIST with small_cnn: SiLU 5.6 points below
# ReLU in validation robust accuracy (benchmarks/RESULTS.md), so every recipe keeps ReLU.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class SmallCNN(nn.Module):
    """Two conv blocks + MLP (the TRADES MNIST net, scaled); fits 8x8 digits and 28x28 images."""

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, width: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        c1, c2, hidden = 32 * width, 64 * width, 200 * width
        act = ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            act(),
            nn.Conv2d(c1, c1, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            act(),
            nn.Conv2d(c2, c2, 3, padding=1),
            act(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He et al. 2016), the network of Wong et al. 2020 and Rice et al. 2020."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        base = 64 * width
        self.conv1 = nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], base
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = base * 2**i
            layers += [PreActBlock(in_planes, planes, stride, activation), PreActBlock(planes, planes, 1, activation)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016), e.g. WRN-34-10 of Madry/TRADES, WRN-28-10."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 28, width: int = 10, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        if (depth - 4) % 6:
            raise ValueError(f"model.depth must be 6n+4 for wide_resnet (e.g. 16, 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(n):
                # WRN blocks are pre-activation basic blocks (Zagoruyko & Komodakis 2016, fig. 1).
                blocks.append(PreActBlock(in_planes, planes, stride if i == 0 else 1, activation))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _small_cnn(c: int, h: int, w: int, *, num_classes: int, width: int, depth: int, activation: str) -> nn.Module:
    if h != w or h % 4:
        raise ValueError(f"small_cnn needs square images with side divisible by 4, got {h}x{w}")
    return SmallCNN(c, h, num_classes, width, activation)


def _preact_resnet18(c: int, h: int, w: int, *, num_classes: int, width: int, depth: int, activation: str) -> nn.Module:
    return PreActResNet18(c, num_classes, width, activation)


def _wide_resnet(c: int, h: int, w: int, *, num_classes: int, width: int, depth: int, activation: str) -> nn.Module:
    return WideResNet(c, num_classes, depth, width, activation)


# The built-in architectures: name -> builder(channels, height, width, *, num_classes, width, depth,
# activation) of the network behind the Normalize layer. `model.name` is checked against this dict.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "preact_resnet18": _preact_resnet18,
    "wide_resnet": _wide_resnet,
}


def architecture(
    config: ModelConfig,
    *,
    shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    """Everything needed to rebuild the network (stored beside the weights; no code, no pickle)."""
    return {
        "name": config.name,
        "width": config.width,
        "depth": config.depth,
        "activation": config.activation,
        "shape": list(shape),
        "num_classes": num_classes,
        "mean": list(mean),
        "std": list(std),
    }


def build_model(arch: dict[str, Any]) -> nn.Module:
    """nn.Sequential(Normalize, network) from an `architecture` dict, weights in channels_last."""
    c, h, w = arch["shape"]
    name, num_classes, width = arch["name"], arch["num_classes"], arch.get("width", 1)
    activation = arch.get("activation", "relu")  # models registered before the option were all ReLU
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown model activation '{activation}'; allowed: {', '.join(ACTIVATIONS)}")
    if len(arch["mean"]) != c or len(arch["std"]) != c:
        raise ValueError(f"mean/std need {c} channel values, got {arch['mean']} / {arch['std']}")
    if name not in MODELS:
        raise ValueError(f"unknown model.name '{name}'; allowed: {', '.join(MODELS)}")
    net = MODELS[name](
        c, h, w, num_classes=num_classes, width=width, depth=arch.get("depth", 28), activation=activation
    )
    model = nn.Sequential(Normalize(tuple(arch["mean"]), tuple(arch["std"])), net)
    # channels_last (NHWC) conv weights make every conv run in NHWC, inputs included: oneDNN's and
    # cuDNN's fast conv path (and the one tensor cores want under autocast). Measured here on CPU:
    # small_cnn PGD-3 training steps 1.21x faster, Square's forward passes 1.56x, preact_resnet18
    # steps 1.01x (benchmarks/memory_format.py, RESULTS.md).
    # Values are unchanged (same maths, another summation order); `.to(device)` keeps the format,
    # and saved weights are made contiguous (pipeline.model_folder.save_weights).
    return model.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------ a stored architecture, checked
# architecture.json may come from anywhere (a folder named on the command line, a download), so it is
# checked key by key before anything is built. The bounds are generous for every network here and keep
# a hostile file from asking for a network that takes minutes or all memory to build.
ARCH_KEYS = ("name", "width", "depth", "activation", "shape", "num_classes", "mean", "std", "weights_sha256")
# Models saved before `activation` existed lack it (built as ReLU); the digest is absent before saving.
_OPTIONAL_KEYS = ("activation", "weights_sha256")
_INT_BOUNDS = {"width": (1, 64), "depth": (10, 1000), "num_classes": (2, MAX_CLASSES)}
_SHA256 = re.compile(r"[0-9a-f]{64}")
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
        raise ModelError(f"expected a JSON object with the keys {', '.join(ARCH_KEYS)}; got {_show(arch)}")
    _check_keys(arch)
    _check_name(arch["name"])
    for key, (low, high) in _INT_BOUNDS.items():
        if type(arch[key]) is not int or not low <= arch[key] <= high:  # type(): true is an int in Python
            raise ModelError(f"key '{key}' is {_show(arch[key])}; expected an integer from {low} to {high}")
    channels = _check_shape(arch["shape"])
    _check_per_channel("mean", arch["mean"], channels, positive=False)
    _check_per_channel("std", arch["std"], channels, positive=True)
    if "activation" in arch and not (isinstance(arch["activation"], str) and arch["activation"] in ACTIVATIONS):
        raise ModelError(
            f"key 'activation' is {_show(arch['activation'])}; expected one of {', '.join(ACTIVATIONS)} "
            "(or no key: ReLU)"
        )
    sha = arch.get("weights_sha256", "")
    if "weights_sha256" in arch and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise ModelError(f"key 'weights_sha256' is {_show(sha)}; expected 64 lowercase hex digits (a sha256)")
    return arch


def _check_keys(arch: dict) -> None:
    unknown = [key for key in arch if key not in ARCH_KEYS]
    if unknown:
        raise ModelError(
            f"unknown key {_short.repr(unknown[0])}"
            + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
            + f"; an architecture has only the keys {', '.join(ARCH_KEYS)}: remove or rename it"
        )
    missing = [key for key in ARCH_KEYS if key not in arch and key not in _OPTIONAL_KEYS]
    if missing:
        raise ModelError(
            f"missing key(s) {', '.join(repr(key) for key in missing)}; an architecture needs "
            f"{', '.join(k for k in ARCH_KEYS if k not in _OPTIONAL_KEYS)} (as pipeline.models.architecture writes)"
        )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or len(name) > 64:
        raise ModelError(f"key 'name' is {_show(name)}; expected one of {', '.join(MODELS)}")
    try:
        registered_name(name, MODELS, "model")
    except ValueError as err:
        raise ModelError(f"key 'name': {err}") from None


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
