"""`model.init`: pretrained weights from a .safetensors file loaded into a freshly built model.

The file may hold an advtrain model's weights (keys `0.*` for the normalisation layer, `1.*` for the
network: what save_weights writes) or the network's own state_dict (a zoo checkpoint converted to
safetensors). Either way every key of the network must be there with its exact shape and nothing else
may be, except the layer `model.reset_head` replaces (its old shape is for other classes); the
normalisation stays the new model's own. A mismatch lists the missing and unexpected keys and the shape
mismatches together, so one attempt shows everything to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import ModelError

MAX_LISTED = 5  # names shown per kind of mismatch
# safetensors' dtype names of the tensors a model holds (float weights, int64 BatchNorm counters).
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


def read_header(weights: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from a safetensors header (which also checks the file's length)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            return {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in names}
    except (SafetensorError, OSError) as err:
        raise ModelError(
            f"{weights}: not a readable safetensors file ({err}); it is truncated or corrupt: "
            "copy or download it again, or re-save the model"
        ) from None


def weights_fit_problems(
    expected: dict[str, torch.Tensor], header: dict[str, tuple[str, list[int]]], *, check_dtype: bool = True
) -> list[str]:
    """What keeps tensors described by `header` from loading into `expected` (a state_dict): missing keys,
    unexpected keys, shape (and dtype) mismatches, each kind listed once; empty when they fit."""

    def differs(key: str, dtype: str, shape: list[int]) -> bool:
        want = expected[key]
        return list(shape) != list(want.shape) or (check_dtype and dtype != DTYPE_NAMES.get(want.dtype))

    missing = [key for key in expected if key not in header]
    unexpected = [key for key in header if key not in expected]
    mismatched = [
        f"{key} (file {dtype}{list(shape)}, model {DTYPE_NAMES.get(expected[key].dtype, expected[key].dtype)}"
        f"{list(expected[key].shape)})"
        for key, (dtype, shape) in header.items()
        if key in expected and differs(key, dtype, shape)
    ]
    return [
        f"{what} ({len(items)}): {', '.join(items[:MAX_LISTED])}{', ...' if len(items) > MAX_LISTED else ''}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches" if not check_dtype else "shape/dtype mismatches", mismatched),
        )
        if items
    ]


def load_pretrained(model: nn.Sequential, weights: str | Path, *, arch: dict[str, Any]) -> None:
    """Load `weights` (model.init) into the network of `model` (build_model's Sequential), in place."""
    weights = Path(weights)
    header = read_header(weights)
    head = arch.get("reset_head", "")
    skip = {f"{head}.weight", f"{head}.bias"} if head else set()
    network = model[1]
    expected = {k: v for k, v in network.state_dict().items() if k not in skip}
    # Either the network's own keys, or an advtrain model's (`1.` prefix; `0.` is the normalisation).
    readings = [{k: v for k, v in header.items() if k not in skip}]
    if any(k.startswith("1.") for k in header):
        stripped = {k[2:]: v for k, v in header.items() if k.startswith("1.")}
        readings.append({k: v for k, v in stripped.items() if k not in skip})
    all_problems = [weights_fit_problems(expected, r, check_dtype=False) for r in readings]
    best = min(range(len(readings)), key=lambda i: len(all_problems[i]))
    problems = all_problems[best]
    if problems:
        raise ModelError(
            f"model.init {weights}: the weights do not fit model.name {arch['name']!r}: {'; '.join(problems)}"
            + ("" if head else ". If only the final layer differs (other classes), set model.reset_head to it")
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelError(f"model.init {weights}: cannot be read as safetensors ({err})") from None
    if best == 1:
        state = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    state = {k: v for k, v in state.items() if k not in skip}
    with torch.no_grad():
        network.load_state_dict(state, strict=not skip)
