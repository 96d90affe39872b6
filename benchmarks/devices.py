"""Where a benchmark's model runs: one `--device` option for every script (issue 31).

The default stays "cpu", so the commands and numbers in RESULTS.md keep their meaning. "cuda" is the
current CUDA device (pick one with CUDA_VISIBLE_DEVICES). Data loading and the comparison of results
stay on the host whatever the option says.

CUDA runs asynchronously: a timer read right after device work measures its launches, not the work.
`synchronize(device)` before every such read (and `elapsed` does it for you).
"""

from __future__ import annotations

import argparse
import time

import torch

DEVICES = ("cpu", "cuda")


def resolve(name: str) -> torch.device:
    """The torch.device for --device NAME; a ValueError that names the fix when CUDA is asked for and absent."""
    if name not in DEVICES:
        raise ValueError(f"--device {name!r}: use one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; use --device cpu, or run on "
            "a machine with a GPU and a CUDA build of torch"
        )
    return torch.device(name)


def _device_argument(name: str) -> torch.device:
    try:
        return resolve(name)
    except ValueError as error:  # argparse prints an ArgumentTypeError's own message, then exits 2
        raise argparse.ArgumentTypeError(str(error)) from error


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device cpu|cuda` (default cpu); the parsed value is a torch.device."""
    parser.add_argument(
        "--device",
        type=_device_argument,
        default="cpu",
        metavar="{cpu,cuda}",
        help="where the model runs (default: cpu, as every number in RESULTS.md; cuda: the current GPU)",
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(started: float, device: torch.device) -> float:
    """Seconds since `started` (a time.perf_counter() value), the device's queued work included."""
    synchronize(device)
    return time.perf_counter() - started


def describe(device: torch.device) -> str:
    """The device in words for a result's header: "cpu", or the GPU's name and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} (sm {major}.{minor}, CUDA {torch.version.cuda})"
    return "cpu"
