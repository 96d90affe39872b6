"""The GPU path's contracts on a CUDA device: tensors stay on it, attacks agree with the CPU's, bf16 autocast
trains, evaluation hands back CPU tensors. Marked `gpu`; `make gpu-check` runs them (`pytest -m gpu
tests/gpu`), and without CUDA they skip, saying so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import pgd
from pipeline.config import AttackConfig, Config, ModelConfig
from pipeline.evaluate import evaluate_chunk
from pipeline.methods import get_method
from pipeline.models import architecture, build_model
from pipeline.training.plan import EpochPlan
from pipeline.training.steps import bf16_is_native, make_optimizer, train_epoch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False); see docs/gpu.md",
    ),
]
EPS = 0.1


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(architecture(ModelConfig(), shape=(1, 8, 8), num_classes=10, mean=(0.3,), std=(0.4,)))


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_a_model_and_attack_step_keeps_every_tensor_on_cuda():
    model = _model().cuda().train()
    x, y = (t.cuda() for t in _batch())
    x_adv = pgd(model, x, y, eps=EPS, step_size=0.025, num_steps=5, generator=torch.Generator("cuda").manual_seed(0))
    assert x_adv.is_cuda and not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters()), "the attack takes input gradients only"
    F.cross_entropy(model(x_adv), y).backward()
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
    assert all(t.is_cuda for t in tensors)


def test_pgd_on_cuda_stays_in_the_ball_and_agrees_with_the_cpu():
    cpu_model = _model().eval()
    cuda_model = _model().cuda().eval()
    x, y = _batch(256)
    robust = {}
    for model, device in ((cpu_model, "cpu"), (cuda_model, "cuda")):
        xd, yd = x.to(device), y.to(device)
        x_adv = pgd(
            model, xd, yd, eps=EPS, step_size=0.0125, num_steps=20, generator=torch.Generator(device).manual_seed(0)
        )
        assert x_adv.device.type == device
        assert float((x_adv - xd).abs().max()) <= EPS + 1e-5 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
        assert not model.training
        with torch.no_grad():
            robust[device] = float((model(x_adv).argmax(1) == yd).float().mean())
    # Random starts come from another RNG stream on each device: close, not equal.
    assert abs(robust["cuda"] - robust["cpu"]) <= 0.05


def test_train_epoch_with_bf16_autocast_on_cuda_keeps_fp32_weights_on_cuda():
    if not bf16_is_native(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()} emulates bf16 (compute capability < 8.0)")
    model = _model().cuda()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, Config().optim)
    stats = train_epoch(
        model,
        model,
        [_batch(), _batch()],
        EpochPlan("pgd_at", get_method("pgd_at"), AttackConfig(eps=EPS, num_steps=3), eps_for_step=lambda step: EPS),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        device=torch.device("cuda"),
        generator=torch.Generator("cuda").manual_seed(0),
        precision="bf16",
    )
    assert torch.isfinite(torch.tensor(stats["loss_sum"])) and stats["count"] == 128
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    momentum = [state["momentum_buffer"] for state in optimizer.state.values()]  # SGD, momentum 0.9
    assert momentum and all(t.is_cuda and t.dtype == torch.float32 for t in momentum)


def test_evaluate_chunk_on_cuda_returns_cpu_tensors():
    model = _model().cuda().eval()
    x, y = _batch(32)  # CPU in, as a Ray task receives them
    result = evaluate_chunk(model, x, y, start=0, norm="linf", eps=EPS, protocol="fast", seed=0)
    outputs = [result.clean_correct, result.predicted_adv, result.grid_x_adv, *result.robust_after.values()]
    assert all(t.device.type == "cpu" for t in outputs)
    assert result.clean_correct.shape == (32,) and set(result.robust_after) == {"apgd_ce", "apgd_t"}


def test_a_split_too_big_for_the_gpu_is_pinned_and_batched_from_pinned_memory():
    from pipeline.training.steps import device_batch, place_split, tensor_batches

    x8 = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(10)
    on_gpu, _ = place_split(x8, y, torch.device("cuda"))
    assert on_gpu.is_cuda, "a small split lives on the GPU"
    pinned, y_pinned = place_split(x8, y, torch.device("cuda"), max_fraction=0.0)
    assert pinned.is_pinned() and not pinned.is_cuda
    xb, yb = next(tensor_batches(pinned, y_pinned, torch.tensor([3, 1, 4]), 3))
    assert xb.is_pinned() and torch.equal(xb, x8[[3, 1, 4]])
    x, _ = device_batch(xb, yb, torch.device("cuda"))
    assert x.is_cuda and x.dtype == torch.float32 and torch.equal(x.cpu(), x8[[3, 1, 4]].float() / 255)
