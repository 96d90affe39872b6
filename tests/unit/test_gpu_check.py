"""benchmarks/gpu_check.py (`make gpu-check`) kept from rotting: its in-process parts 2-4 (every method,
every attack, 2 DDP ranks) pass on the CPU at the tiniest sizes, and a --cpu run writes where it says.
The whole script, on a GPU, is `make gpu-check` (docs/gpu.md)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline import data

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/ is scripts, not a package; on sys.path, the DDP part's spawned ranks import it by name too.
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_check = importlib.import_module("gpu_check")


def test_parts_2_to_4_pass_on_the_cpu_and_the_results_land_in_the_cpu_folder(digits_path, tmp_path):
    torch.set_num_threads(1)
    cpu, sizes = torch.device("cpu"), gpu_check.TINY
    arch = gpu_check.digits_architecture(digits_path)
    x, y = data.load_split(digits_path, "train")
    x_test, y_test = (t[: sizes.attack_examples] for t in data.load_split(digits_path, "test"))
    model = gpu_check.reference_model(arch, x, y, epochs=sizes.reference_epochs)
    parts = {
        "training": gpu_check.guarded("training", gpu_check.check_training, arch, x, y, device=cpu, sizes=sizes),
        "attacks": gpu_check.guarded("attacks", gpu_check.check_attacks, model, x_test, y_test, device=cpu),
        "ddp": gpu_check.guarded("ddp", gpu_check.check_ddp, arch, x, y, device=cpu, sizes=sizes),
    }

    failed = [(name, c) for name, part in parts.items() for c in part["checks"] if c["status"] == "fail"]
    assert not failed
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "pass")
    assert {c["check"] for c in parts["attacks"]["checks"]} == set(gpu_check.ATTACKS), "every attack is checked"
    assert all(c["cpu_robust_acc"] == gpu_check.NO_CUDA for c in parts["attacks"]["checks"])
    assert len(parts["training"]["checks"]) == 4 * len(gpu_check.METHODS)

    assert gpu_check.results_dir(cpu=True) == ROOT / "benchmarks/results/gpu/cpu"
    assert gpu_check.results_dir(cpu=False) == ROOT / "benchmarks/results/gpu"
    parts = {"environment": gpu_check.guarded("environment", gpu_check.environment, cpu), **parts}
    gpu_check.write_results({"mode": "cpu", "date": "now", "seconds": 1.0, "passed": True, "parts": parts}, tmp_path)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["parts"]["ddp"]["checks"][0]["status"] == "pass"
    assert written["parts"]["environment"]["capability"] == gpu_check.NO_CUDA
    assert "| attacks | pass |" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_and_without_cpu_it_stops_at_once_saying_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the script runs instead of stopping")
    assert gpu_check.main([]) == 2
    assert "CUDA is absent" in capsys.readouterr().err
