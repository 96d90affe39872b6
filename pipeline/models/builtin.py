"""The built-in architectures (one registry, MODELS) and the Normalize layer every model starts with.

Written here rather than taken from torchvision (whose PyPI build does not import beside this torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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
