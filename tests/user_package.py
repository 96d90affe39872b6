"""A user's own model package, written into a folder outside pipeline/ by the tests that bring their own
model: a small conv net for 8x8 (digits) or 28x28 images that returns a tuple (logits, features)."""

from __future__ import annotations

import itertools
from pathlib import Path

_COUNTER = itertools.count()

NETS = '''
import torch
from torch import nn

from .layers import flatten


class TupleNet(nn.Module):
    """(logits, features): the logits are output 0."""

    def __init__(self, channels: int, classes: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        features = flatten(self.pool(torch.relu(self.conv(x))))
        return self.fc(features), features


def build(channels: int = 1, classes: int = 10, width: int = 16) -> nn.Module:
    return TupleNet(channels, classes, width)


def dict_output(channels: int = 1, classes: int = 10) -> nn.Module:
    net = TupleNet(channels, classes, 8)

    class AsDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            logits, features = self.net(x)
            return {"logits": logits, "features": features}

    return AsDict()


def not_a_module(**kwargs):
    return "a string"
'''

LAYERS = """
def flatten(x):
    return x.view(x.shape[0], -1)  # .view: fails on an NHWC activation, as much user code would
"""


def write_user_package(root: Path) -> str:
    """A fresh package (a unique name, so no earlier import is reused) in `root`; returns its module path."""
    name = f"usernets_{next(_COUNTER)}_{abs(hash(str(root))) % 10**8}"
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    (package / "layers.py").write_text(LAYERS)
    return f"{name}.nets"
