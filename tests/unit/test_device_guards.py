"""CPU guards for the GPU path: what can be checked without a GPU.

Every random generator and every tensor factory in the attacks, training and evaluation code names its
device: a factory without one makes a CPU tensor, which on a GPU either fails (a CPU generator for CUDA
randomness) or silently copies between host and device every step.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from pipeline.models import build_model, input_memory_format
from pipeline.orchestrate.cluster import check_gpus
from pipeline.orchestrate.train import worker_env
from pipeline.training.state import WeightAverage
from pipeline.training.steps import device_batch, place_split, tensor_batches

ROOT = Path(__file__).resolve().parents[2]
CHECKED = [
    *sorted((ROOT / "pipeline/attacks").glob("*.py")),
    *sorted((ROOT / "pipeline/training").glob("*.py")),
    ROOT / "pipeline/evaluate.py",
    ROOT / "pipeline/sanity.py",
    ROOT / "pipeline/methods.py",
]
FACTORIES = {
    "Generator", "rand", "randn", "randint", "randperm", "zeros", "ones", "empty", "full", "arange",
    "tensor", "as_tensor", "linspace", "eye",
}  # fmt: skip


def _factory_calls_without_device(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, named = node.func.value, any(keyword.arg == "device" for keyword in node.keywords)
        if isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES and not named:
            found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}(...)")
    return found


def test_every_generator_and_tensor_factory_names_its_device():
    assert len(CHECKED) > 20
    missing = [call for path in CHECKED for call in _factory_calls_without_device(path)]
    assert not missing, "give these device= (the input's device, or 'cpu' where a host tensor is meant):\n" + "\n".join(
        missing
    )


def test_the_guard_sees_a_factory_without_a_device(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import torch\nnoise = torch.rand(\n    3, generator=g\n)\nok = torch.rand(3, device=d)\n"
    )
    assert _factory_calls_without_device(tmp_path / "bad.py", tmp_path) == ["bad.py:2 torch.rand(...)"]


def test_inputs_take_the_models_memory_format_and_uint8_batches_become_float():
    arch = {"name": "small_cnn", "shape": [3, 8, 8], "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert input_memory_format(build_model(arch)) == torch.channels_last  # built-ins: NHWC weights
    assert input_memory_format(nn.Sequential(nn.Conv2d(3, 4, 3))) == torch.contiguous_format
    x8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, device="cpu")
    x, y = device_batch(x8, torch.arange(5, device="cpu"), torch.device("cpu"))
    assert x.dtype == torch.float32 and torch.equal(x, x8.float() / 255)
    placed, _ = place_split(x8, y, torch.device("cpu"))
    assert placed is x8, "on a CPU device the split stays where it is"
    batches = list(tensor_batches(x8, y, torch.tensor([4, 0, 2], device="cpu"), 2))
    assert [b[1].tolist() for b in batches] == [[4, 0], [2]]


def test_fused_weight_average_equals_the_per_tensor_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    fused = WeightAverage(model, decay=0.9)
    reference = copy.deepcopy(model)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        fused.update(model)
        d = min(0.9, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(reference.parameters(), model.parameters(), strict=True):
                averaged.lerp_(current, 1 - d)
            for averaged, current in zip(reference.buffers(), model.buffers(), strict=True):
                averaged.copy_(current)
    for (name, a), b in zip(fused.model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_nccl_settings_reach_the_workers_and_nothing_else():
    env = worker_env({"NCCL_SOCKET_IFNAME": "eth0", "TORCH_NCCL_BLOCKING_WAIT": "1", "HOME": "/root", "PATH": "/bin"})
    assert env == {
        "NCCL_SOCKET_IFNAME": "eth0",
        "TORCH_NCCL_BLOCKING_WAIT": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def test_gpu_workers_beyond_this_machines_gpus_are_refused_before_ray(monkeypatch):
    from pipeline.config import Config, ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    have = torch.cuda.device_count()
    config = Config.model_validate({"scaling": {"use_gpu": True, "num_workers": have + 1}})
    with pytest.raises(ConfigError, match=f"needs {have + 1} GPUs"):
        check_gpus(config)
    check_gpus(config.model_copy(update={"scaling": config.scaling.model_copy(update={"use_gpu": False})}))
    if not ray.is_initialized():  # connected (an integration test's instance in this process): that one counts
        check_gpus(config, "ray://elsewhere:10001")  # a cluster at an address is checked once connected
