"""The typed Python entry to the C++ op (csrc/python_entry.cpp) is the same call as
torch.ops: same results and gradients, and everything that watches the dispatcher or
__torch_function__ still sees the op."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sae_kernels import FusedSaE, FusedSE
from sae_kernels.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available() or cpu.op_entry() is
                                torch.ops.sae_kernels.cpu_sae,
                                reason="the C++ CPU kernels or their entry did not build")

OP = torch.ops.sae_kernels.cpu_sae


def _operands(requires_grad: bool):
    torch.manual_seed(0)
    x = torch.randn(3, 19, 5, 7)
    w1s = [torch.randn(4, 19), torch.randn(2, 19)]
    b1s = [torch.randn(4), torch.randn(2)]
    w2, b2 = torch.randn(19, 6), torch.randn(19)
    identity, scale, shift = torch.randn_like(x), torch.rand(19) + 0.5, torch.randn(19)
    tensors = [x, *w1s, *b1s, w2, b2, identity, scale, shift]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return (x, w1s, b1s, w2, b2, identity, 1, 0, True, True, scale, shift, 2), tensors


@pytest.mark.parametrize("requires_grad", [False, True])
def test_same_results_and_gradients_as_torch_ops(requires_grad):
    args, tensors = _operands(requires_grad)
    results = []
    for call in (OP, cpu.op_entry()):
        y = call(*args)
        grads = []
        if requires_grad:
            grads = torch.autograd.grad(y, tensors, torch.ones_like(y))
        results.append([y, *grads])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_dispatch_modes_see_the_op():
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args, _ = _operands(False)
    with Recorder():
        cpu.op_entry()(*args)
    assert seen == ["sae_kernels.cpu_sae.default"]


def test_torch_function_modes_and_subclasses_go_through_torch_ops():
    seen = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Tagged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += 1
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    args, _ = _operands(False)
    expected = OP(*args)
    with Recorder():
        y = cpu.op_entry()(*args)
    assert torch.equal(y, expected)
    assert "sae_kernels.cpu_sae" in seen
    tagged = (args[0].as_subclass(Tagged), *args[1:])
    assert torch.equal(cpu.op_entry()(*tagged), expected)
    assert Tagged.calls == 1


def test_bad_arguments_get_torch_ops_errors():
    args, _ = _operands(False)
    with pytest.raises(Exception) as through_ops:
        OP("x", *args[1:])
    with pytest.raises(type(through_ops.value)) as through_entry:
        cpu.op_entry()("x", *args[1:])
    assert str(through_entry.value) == str(through_ops.value)
    with pytest.raises(ValueError, match="x must be 4-D"):
        cpu.op_entry()(args[0][0], *args[1:])


def test_modules_call_the_entry_in_eager_and_torch_ops_when_compiling(monkeypatch):
    calls = []
    entry = cpu._entry
    monkeypatch.setattr(cpu, "_entry", lambda *a: calls.append(1) or entry(*a))
    x = torch.randn(2, 16, 3, 3)
    for module in (FusedSaE(16, reduction=4), FusedSE(16, reduction=4)):
        module(x)
    assert len(calls) == 2
    monkeypatch.setenv("SAE_KERNELS_UNDER_COMPILE", "op")
    module = FusedSE(16, reduction=4)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=0)
    assert len(calls) == 3  # the eager call only


def test_profiler_and_trace_see_the_op():
    module = FusedSE(16, reduction=4).eval()
    x = torch.randn(2, 16, 3, 3)
    with torch.profiler.profile() as prof:
        module(x)
    assert any(e.name == "sae_kernels::cpu_sae" for e in prof.events())
    traced = torch.jit.trace(module, x, check_trace=False)
    assert "sae_kernels::cpu_sae" in str(traced.graph)
