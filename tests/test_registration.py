"""torch.library registration: opcheck, gradcheck, torch.compile, determinism, purity."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from helpers import DEVICE
from sae_kernels import FusedSaE, SaE, sae
from sae_kernels.dispatch import under_compile_setting
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.ops import sae_backward, sae_forward


def _operands(n=2, c=5, h=3, w=4, k=6, dtype=torch.float64, identity=True, channels_last=False):
    gen = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE).requires_grad_(True)

    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(DEVICE).requires_grad_(True)
    return x, make(k, c), make(k), make(c, k), make(c), (make(n, c, h, w) if identity else None)


#: The forward as training runs it: behind the ReLU tail it writes the mask the backward
#: reads (``sae()`` asks for it wherever a gradient is due).
SAVE_MASK = {"save_relu_mask": True}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("options", [("relu", "sigmoid", False, "relu"),
                                     ("gelu", "hardsigmoid", True, "none")])
@pytest.mark.parametrize("strategy", ["single", "split"])
def test_opcheck(strategy, options, channels_last):
    act, gate, residual, act_out = options
    args = (*_operands(dtype=torch.float32, channels_last=channels_last), act, gate, residual,
            act_out, strategy)
    torch.library.opcheck(sae_forward, args, SAVE_MASK)


@pytest.mark.parametrize("strategy", ["single", "split"])
def test_opcheck_single_fc(strategy):
    x, w1, b1, _, _, identity = _operands(k=5, dtype=torch.float32)
    torch.library.opcheck(sae_forward, (x, w1, b1, None, None, identity, "relu", "hardsigmoid",
                                        True, "relu", strategy), SAVE_MASK)
    y, _, p, u, _ = sae_forward(x, w1, b1, None, None, None, "relu", "sigmoid", False, "none",
                                strategy)
    torch.library.opcheck(sae_backward, (torch.randn_like(y), x.detach(), None, w1.detach(), None,
                                         p, u, "relu", "sigmoid", False, "none", False))


@pytest.mark.parametrize("has_identity", [False, True])
@pytest.mark.parametrize("act_out", ["none", "relu"])
def test_opcheck_backward(act_out, has_identity):
    x, w1, b1, w2, b2, identity = _operands(dtype=torch.float32, identity=has_identity)
    args = (x, w1, b1, w2, b2, identity, "silu", "sigmoid", True, act_out, "split")
    y, _, p, u, mask = sae_forward(*args, **SAVE_MASK)
    grad = torch.randn_like(y)
    torch.library.opcheck(sae_backward, (grad, x.detach(), mask, w1.detach(), w2.detach(),
                                         p, u, "silu", "sigmoid", True, act_out, has_identity))


def test_the_relu_mask_is_written_only_where_a_gradient_is_due(monkeypatch):
    """``sae()`` asks the forward for the ReLU tail's mask only where autograd will run
    the backward; a backward without it says what is missing."""
    asked = []

    def recording(*args):
        asked.append(args[-1])
        return sae_forward(*args)

    monkeypatch.setattr("sae_kernels.ops.sae_forward", recording)
    x, w1, b1, w2, b2, identity = _operands(dtype=torch.float32)
    with torch.no_grad():
        sae(x, w1, b1, w2, b2, identity, act_out="relu", backend="triton")
    sae(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), identity.detach(),
        act_out="relu", backend="triton")
    sae(x, w1, b1, w2, b2, identity, act_out="relu", backend="triton").sum().backward()
    assert asked == [False, False, True]
    y, _, p, u, mask = sae_forward(x, w1, b1, w2, b2, identity, "relu", "sigmoid", True, "relu",
                                   "split")
    assert mask.numel() == 0
    with pytest.raises(RuntimeError, match="save_relu_mask=True"):
        sae_backward(torch.ones_like(y), x.detach(), mask, w1.detach(), w2.detach(), p, u,
                     "relu", "sigmoid", True, "relu", True)


@pytest.mark.parametrize("strategy", ["single", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(7, 9), (7, 8)], ids=["hw63", "hw56"])
def test_the_relu_mask_packs_y_above_zero_along_the_contiguous_axis(hw, channels_last,
                                                                     strategy):
    """The mask the forward returns is ``layout.relu_mask``'s: bit i of a byte is the i-th
    element along x's contiguous axis, 1 where y > 0, the last byte padded with 0 bits
    (HW = 56 lets contiguous NCHW take the flat rescale)."""
    n, c = 2, 19
    operands = _operands(n, c, *hw, dtype=torch.float32, channels_last=channels_last)
    y, _, _, _, mask = sae_forward(*operands, "relu", "sigmoid", True, "relu", strategy,
                                   **SAVE_MASK)
    kept = (y > 0).detach().cpu().reshape(n, c, -1)
    if channels_last:
        kept = kept.transpose(1, 2)
    expected = np.packbits(kept.numpy(), axis=-1, bitorder="little")
    assert torch.equal(mask.cpu(), torch.from_numpy(expected))


@pytest.mark.parametrize("strategy", ["single", "split"])
@pytest.mark.parametrize("prologue_act", ["none", "silu"])
def test_opcheck_prologue(prologue_act, strategy):
    """The prologue's operands through both ops, its gradients included."""
    x, w1, b1, w2, b2, identity = _operands(dtype=torch.float32, channels_last=True)
    scale = (torch.rand(5) + 0.5).to(DEVICE).requires_grad_(True)
    shift = torch.randn(5).to(DEVICE).requires_grad_(True)
    args = (x, w1, b1, w2, b2, identity, "relu", "sigmoid", True, "relu", strategy, scale, shift,
            prologue_act)
    torch.library.opcheck(sae_forward, args, SAVE_MASK)
    y, _, p, u, mask = sae_forward(*args, **SAVE_MASK)
    torch.library.opcheck(sae_backward, (torch.randn_like(y), x.detach(), mask,
                                         w1.detach(), w2.detach(), p, u, "relu", "sigmoid", True,
                                         "relu", True, scale.detach(), shift.detach(),
                                         prologue_act, True))


@pytest.mark.parametrize("act", ["relu", "silu", "hardswish", "gelu"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("strategy", ["single", "split"])
def test_gradcheck_float64(act, gate, strategy):
    x, w1, b1, w2, b2, identity = _operands()

    def fn(x, w1, b1, w2, b2, identity):
        return sae(x, w1, b1, w2, b2, identity, act=act, gate=gate, residual=True,
                   act_out="relu", backend="triton", strategy=strategy)

    # fast mode checks random projections of the Jacobian: a few interpreter launches
    # instead of two per input element
    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2, identity), fast_mode=True)


@pytest.mark.parametrize("strategy", ["single", "split"])
def test_gradcheck_float64_full_jacobian(strategy):
    x, w1, b1, w2, b2, identity = _operands(n=1, c=3, h=1, w=2, k=2)

    def fn(x, w1, b1, w2, b2, identity):
        return sae(x, w1, b1, w2, b2, identity, act="gelu", backend="triton", strategy=strategy)

    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2, identity))


@pytest.mark.parametrize("strategy", ["single", "split"])
@pytest.mark.parametrize("prologue_act", ["none", "relu", "silu", "hardswish"])
def test_gradcheck_float64_prologue(prologue_act, strategy):
    x, w1, b1, w2, b2, identity = _operands()
    scale = (torch.rand(5, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_(True)
    shift = torch.randn(5, dtype=torch.float64).to(DEVICE).requires_grad_(True)

    def fn(x, w1, b1, w2, b2, identity, scale, shift):
        return sae(x, w1, b1, w2, b2, identity, act="silu", residual=True, act_out="relu",
                   backend="triton", strategy=strategy, prologue_scale=scale,
                   prologue_shift=shift, prologue_act=prologue_act)

    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2, identity, scale, shift),
                                    fast_mode=True)


@pytest.mark.parametrize("backend, strategy", [("triton", "single"), ("triton", "split"),
                                               ("cpu", "auto")])
def test_gradcheck_single_fc(backend, strategy):
    """The single-FC form, residual and ReLU tail included, on both backends."""
    if backend == "cpu" and (DEVICE.type != "cpu" or not cpu_kernels.available()):
        pytest.skip("needs the C++ CPU kernels")
    x, w1, b1, _, _, identity = _operands(n=2, c=3, h=2, w=2, k=3)

    def fn(x, w1, b1, identity):
        return sae(x, w1, b1, None, None, identity, gate="sigmoid", residual=True,
                   act_out="relu", backend=backend, strategy=strategy)

    # the interpreter's launches are slow: random projections of the Jacobian for Triton
    assert torch.autograd.gradcheck(fn, (x, w1, b1, identity), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend, strategy, compiler", [
    ("triton", "single", "aot_eager"), ("triton", "split", "aot_eager"),
    ("triton", "split", "inductor"), ("cpu", "auto", "aot_eager")])
def test_compile_fullgraph_forward_backward(backend, strategy, compiler, compile_setting):
    """The fused op itself under torch.compile (traced as the op, not as its composite),
    the same bits as eager. Inductor's layout optimisation stays off: in a layout of its
    choosing (channels_last) the op sums in another order, as the convolution does."""
    if backend == "cpu" and (DEVICE.type != "cpu" or not cpu_kernels.available()):
        pytest.skip("needs the C++ CPU kernels")
    compile_setting("op")
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = SaE(16, reduction=4, cardinality=4, act="silu", residual=True)
    fused = FusedSaE.from_module(ref, backend=backend, strategy=strategy).to(DEVICE)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), fused).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with inductor_config.patch(layout_optimization=False):
        compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["single", "split"])
def test_same_bits_every_run_and_inputs_untouched(strategy):
    x, w1, b1, w2, b2, identity = _operands(n=3, c=19, h=13, w=17, k=8, dtype=torch.float32)
    before = [t.detach().clone() for t in (x, w1, b1, w2, b2, identity)]
    grad = torch.randn_like(x)
    results = []
    for _ in range(2):
        out = sae(x, w1, b1, w2, b2, identity, act_out="relu", backend="triton", strategy=strategy)
        grads = torch.autograd.grad(out, (x, w1, b1, w2, b2, identity), grad)
        results.append([out, *grads])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    for t, b in zip((x, w1, b1, w2, b2, identity), before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("strategy", ["single", "split"])
def test_nan_and_inf_propagate_like_the_reference(strategy):
    x, w1, b1, w2, b2, _ = _operands(n=3, c=6, h=4, w=5, dtype=torch.float32)
    x = x.detach().clone()
    x[0, 2, 1, 1] = float("nan")
    x[1, 4, 0, 3] = float("inf")
    x[2, 0, 2, 2] = -float("inf")
    for residual, gate in itertools.product((False, True), ("sigmoid", "hardsigmoid")):
        options = dict(residual=residual, gate=gate)
        fused = sae(x, w1, b1, w2, b2, **options, backend="triton", strategy=strategy)
        ref = sae(x, w1, b1, w2, b2, **options, backend="reference")
        assert torch.equal(fused.isnan(), ref.isnan())
        assert torch.equal(fused.isinf(), ref.isinf())
        finite = ref.isfinite()
        torch.testing.assert_close(fused[finite], ref[finite])


def test_autocast_half_activations_with_fp32_weights():
    """Under autocast a conv hands the block half activations while its weights stay fp32;
    the result has the reference's dtype and its values within the half dtype's rounding."""
    torch.manual_seed(0)
    half = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(DEVICE)
    ref = SaE(16, reduction=4, cardinality=2).to(DEVICE)
    fused = FusedSaE.from_module(ref, backend="triton")
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=half):
        h = conv(x)
        assert h.dtype == half
        y_ref, y = ref(h), fused(h)
    assert y.dtype == y_ref.dtype == half
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
    # the reference rounds s to the half dtype before the rescale; the fused path does not
    torch.testing.assert_close(y, y_ref, rtol=2 * torch.finfo(half).eps, atol=1e-3)


def _traced_ops(model: torch.nn.Module, *args) -> set[str]:
    """The call_function targets of the graph torch.compile traces of ``model``."""
    seen = set()

    def backend(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return seen


@pytest.mark.parametrize("setting, traces_op", [("auto", False), ("composite", False),
                                                 ("op", True)])
def test_compile_traces_the_composite_on_cpu(setting, traces_op, compile_setting):
    """The rule of dispatch.runs_composite: the C++ op is traced as its ATen
    composite (prologue and epilogue included), which inductor fuses with its neighbours;
    SAE_KERNELS_UNDER_COMPILE overrides it. The composite computes the same function."""
    if not cpu_kernels.available():
        pytest.skip("needs the C++ CPU kernels")
    compile_setting(setting)
    torch.manual_seed(0)
    fused = FusedSaE.from_module(SaE(16, reduction=4, cardinality=2, act_out="relu"))
    x, identity = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    ops = _traced_ops(fused, x, identity)
    assert any(op.startswith("sae_kernels.cpu_sae") for op in ops) == traces_op, ops
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, identity), fused(x, identity))


def test_a_new_setting_retraces_a_compiled_block(compile_setting):
    """What torch.compile traces follows set_under_compile even after a first compile: the
    setting is a global dynamo guards on, so a graph traced under one setting is traced
    again under another (a setting read from the environment at trace time became a
    constant of the first graph, which every later call ran)."""
    if not cpu_kernels.available():
        pytest.skip("needs the C++ CPU kernels")
    traced_ops = []

    def backend(gm, inputs):
        traced_ops.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    torch.manual_seed(0)
    fused = FusedSaE.from_module(SaE(16, reduction=4, cardinality=2))
    x = torch.randn(2, 16, 5, 5)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    for setting in ("composite", "op", "composite"):
        compile_setting(setting)
        torch.testing.assert_close(compiled(x), fused(x))
    holds_op = [any(op.startswith("sae_kernels.cpu_sae") for op in ops) for ops in traced_ops]
    assert holds_op == [False, True], traced_ops


def test_compile_keeps_the_triton_op(compile_setting):
    compile_setting("auto")
    fused = FusedSaE.from_module(SaE(16, reduction=4, cardinality=2), backend="triton")
    ops = _traced_ops(fused.to(DEVICE), torch.randn(2, 16, 5, 5, device=DEVICE))
    assert any(op.startswith("sae_kernels.sae_forward") for op in ops), ops


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_op_keeps_inductors_layout(backend, compile_setting):
    """The ops carry the flexible_layout tag: where inductor lays the convolutions out
    channels_last, the op reads the convolution's output as it is and returns y
    channels_last, with no copy to NCHW before it and back after it."""
    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("needs the C++ CPU kernels")
    compile_setting("op")
    torch.manual_seed(0)
    se = FusedSaE.from_module(SaE(16, reduction=4, cardinality=1), backend=backend)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), se, torch.nn.Conv2d(16, 8, 1))
    model = model.to(DEVICE).eval()
    x = torch.randn(2, 8, 6, 5, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(force_layout_optimization=True,
                                                         fx_graph_cache=False):
        out, codes = run_and_get_code(torch.compile(model, fullgraph=True), x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    op = "sae_kernels.cpu_sae" if backend == "cpu" else "sae_kernels.sae_forward"
    checks = [line for code in codes for line in code.splitlines()
              if "assert_tensor_metadata" in line and op in line and "(2, 16, 6, 5)" in line]
    channels_last = str(torch.empty(2, 16, 6, 5).to(memory_format=torch.channels_last).stride())
    assert checks and all(channels_last in line for line in checks), checks


def test_under_compile_setting_is_checked(compile_setting):
    before = under_compile_setting()
    with pytest.raises(ValueError, match="the setting must be one of auto, op, composite"):
        compile_setting("sometimes")
    assert under_compile_setting() == before
    env = dict(os.environ, SAE_KERNELS_UNDER_COMPILE="sometimes")
    run = subprocess.run([sys.executable, "-c", "import sae_kernels"], env=env,
                         capture_output=True, text=True)
    assert "SAE_KERNELS_UNDER_COMPILE must be one of" in run.stderr, run.stderr[-2000:]
