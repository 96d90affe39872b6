"""Square attack without a host sync per query (issue 31), proven on CPU: every aten op whose result the
host must read back (a sync on a GPU) is recorded, and a run may have one per block of queries."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.attacks import get_attack

square_module = importlib.import_module("pipeline.attacks.square")

# Ops that read a value back to the host, or whose output shape depends on the data (nonzero and its kin).
READ_BACK = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.repeat_interleave.Tensor,
}
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


class _InOneHot(TorchFunctionMode):
    """Marks F.one_hot: on CPU it checks the labels' range with .item(); on CUDA it skips the check and
    relies on scatter's device assert (aten/src/ATen/native/Onehot.cpp), so that read is not a GPU sync."""

    depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.one_hot and func is not torch._C._nn.one_hot:
            return func(*args, **(kwargs or {}))
        _InOneHot.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            _InOneHot.depth -= 1


class ReadBacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _InOneHot.depth == 0:
            indices = args[1] if func in INDEXING else ()
            bool_index = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
            if func in READ_BACK or bool_index:
                self.ops.append(str(func))
        return func(*args, **kwargs)


def _count_read_backs(fn) -> list[str]:
    with _InOneHot(), ReadBacks() as mode:
        fn()
    return mode.ops


class NeverFooled(nn.Module):
    """Class 0 wins by 100 whatever the input, so every example is attacked for the whole budget (the
    most queries, the most chances to sync); the margin still depends on x, so moves are kept or not."""

    def __init__(self, shape):
        super().__init__()
        self.linear = nn.Linear(math.prod(shape), 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x.flatten(1)) + torch.tensor([100.0, 0.0, 0.0])


def test_detector_sees_the_syncs_the_old_loop_had():
    t = torch.randn(8)
    ops = _count_read_backs(
        lambda: (int(torch.randint(0, 3, (1,))), float(t.sum()), (t > 0).nonzero(), t[t > 0], bool(t.any()))
    )
    assert len(ops) == 5, ops


@pytest.mark.parametrize(("shape", "norm", "eps"), [((1, 28, 28), "linf", 0.1), ((3, 32, 32), "l2", 1.0)])
def test_at_most_one_read_back_per_block_of_queries(shape, norm, eps):
    torch.manual_seed(0)
    model = NeverFooled(shape)
    x, y = torch.rand(16, *shape), torch.zeros(16, dtype=torch.long)
    num_queries = 200
    generator = torch.Generator().manual_seed(0)
    ops = _count_read_backs(
        lambda: get_attack("square")(model, x, y, eps=eps, norm=norm, num_queries=num_queries, generator=generator)
    )
    assert model.calls == num_queries  # the init and every query ran: nothing was skipped
    # One nonzero() per block to compact the unbroken examples; a sync per query would be ~200.
    assert len(ops) <= math.ceil(num_queries / square_module.COMPACT_EVERY), ops
    assert set(ops) <= {"aten.nonzero.default"}, ops


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_generator_seed_same_result(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    a, b = (
        get_attack("square")(
            model, x, y, eps=0.3, norm=norm, num_queries=100, generator=torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
