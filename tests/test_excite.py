"""The C++ excitation alone (``sae_kernels::cpu_excite``) and the rule that puts it in the
composite torch.compile traces on a CPU (``dispatch.cpu_excitation_for``)."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sae_kernels import FusedSaE, SaE, convert, senetv2_resnet
from sae_kernels.cost import fc_flops
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.kernels import cpu_reference
from sae_kernels.options import ACTIVATIONS, GATES
from sae_kernels.reference import excitation

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="the C++ CPU kernels did not build")

#: Per dtype, the tolerance on s (a gate in [0, 1]) against the float64 excitation. float64:
#: the two FCs' sums in another order, a few ulps. float32: K and C terms of unit scale per
#: output, each rounded at 2^-24, ~1e-6 after the gate's slope of at most 1/4 (checked
#: at 1e-5). bfloat16: z rounded to 8 bits on the way in, then fp32 accumulation; s itself
#: rounded to bf16 (2^-9 relative), so 1e-2 covers both.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}

#: (N, C, branch widths, with fc2): odd channel counts, N = 0 and 1, four branches, the
#: single-FC form (one C x C matrix)
SHAPES = [(1, 64, [16], True), (3, 19, [2, 3], True), (2, 1, [1], True), (2, 3, [1, 1, 1], True),
          (0, 19, [4], True), (5, 7, [7], False), (8, 1024, [32] * 4, True)]


def _operands(n, c, widths, with_fc2, dtype, weight_dtype=torch.float32):
    """z and nn.Linear-scaled weights (outputs of unit scale, so the gate is not saturated)."""
    g = torch.Generator().manual_seed(n * 1000 + c)

    def rand(*shape, fan_in=1):
        return torch.randn(*shape, generator=g, dtype=weight_dtype) / fan_in ** 0.5

    z = torch.randn(n, c, generator=g).to(dtype)
    w1s = [rand(k, c, fan_in=c) for k in widths]
    b1s = [rand(k) for k in widths]
    k = sum(widths)
    w2, b2 = (rand(c, k, fan_in=k), rand(c)) if with_fc2 else (None, None)
    return z, w1s, b1s, w2, b2


def _truth(z, w1s, b1s, w2, b2, act, gate):
    def f64(t):
        return None if t is None else t.double()

    return excitation(f64(z), [f64(w) for w in w1s], [f64(b) for b in b1s], f64(w2), f64(b2),
                      act, gate)


#: every act and gate on every shape (the single-FC form has no act: one case a gate)
CASES = [(act, gate, shape) for shape in SHAPES
         for act in (ACTIVATIONS if shape[3] else ACTIVATIONS[:1]) for gate in GATES]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("act, gate, shape", CASES, ids=lambda v: (
    f"{v[0]}x{v[1]}-{len(v[2])}b-{'fc2' if v[3] else 'single'}" if isinstance(v, tuple) else v))
def test_excite_computes_the_reference_excitation(act, gate, shape, dtype):
    """The library and its stand-in against the float64 excitation, in z's dtype."""
    n, c, widths, with_fc2 = shape
    z, w1s, b1s, w2, b2 = _operands(n, c, widths, with_fc2, dtype)
    truth = _truth(z, w1s, b1s, w2, b2, act, gate)
    args = (z, w1s, b1s, w2, b2, ACTIVATIONS.index(act), GATES.index(gate))
    for s in (torch.ops.sae_kernels.cpu_excite(*args), cpu_reference.excite(*args)):
        assert (s.shape, s.dtype) == (z.shape, z.dtype)
        torch.testing.assert_close(s.double(), truth, rtol=0, atol=TOLERANCE[dtype])
    fake = cpu_reference.excite_fake(*args)
    assert (fake.shape, fake.dtype) == (z.shape, z.dtype)


def test_excite_reads_its_operands_in_place():
    """Weights of another dtype and strided z are read as they are, and nothing is written
    into them."""
    z, w1s, b1s, w2, b2 = _operands(4, 19, [3, 2], True, torch.float32, torch.float64)
    z = torch.randn(19, 4).T  # not contiguous
    before = [t.clone() for t in (z, *w1s, *b1s, w2, b2)]
    s = torch.ops.sae_kernels.cpu_excite(z, w1s, b1s, w2, b2, 0, 0)
    torch.testing.assert_close(s.double(), _truth(z, w1s, b1s, w2, b2, "relu", "sigmoid"),
                               rtol=0, atol=TOLERANCE[torch.float32])
    assert all(torch.equal(a, b) for a, b in zip(before, (z, *w1s, *b1s, w2, b2), strict=True))


@pytest.mark.parametrize("call", [torch.ops.sae_kernels.cpu_excite, cpu_reference.excite_fake],
                         ids=["library", "fake"])
def test_excite_rejects_bad_operands_by_name(call):
    z, w1s, b1s, w2, b2 = _operands(2, 5, [3], True, torch.float32)
    with pytest.raises(ValueError, match=r"z must be 2-D \(N, C\)"):
        call(z[:, :, None], w1s, b1s, w2, b2, 0, 0)
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \(K, C=5\)"):
        call(z, [torch.randn(3, 4)], b1s, w2, b2, 0, 0)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(C=5, K=3\)"):
        call(z, w1s, b1s, torch.randn(5, 4), b2, 0, 0)
    with pytest.raises(ValueError, match="gate code"):
        call(z, w1s, b1s, w2, b2, 0, 7)


def test_flop_counter_counts_the_excitation():
    z, w1s, b1s, w2, b2 = _operands(3, 19, [2, 3], True, torch.float32)
    with FlopCounterMode(display=False) as counter:
        torch.ops.sae_kernels.cpu_excite(z, w1s, b1s, w2, b2, 0, 0)
    assert counter.get_total_flops() == fc_flops(3, 19, 5)


def _compiled_ops(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> tuple[set, torch.Tensor]:
    """The call_function targets of the graph torch.compile traces of ``model`` on x, and
    its output (grad mode on or off)."""
    seen = set()

    def backend(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return seen, out


def _holds_excite(ops: set) -> bool:
    return any(op.startswith("sae_kernels.cpu_excite") for op in ops)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cardinality", [1, 4])
def test_compiled_inference_runs_the_cpp_excitation(cardinality, channels_last, compile_setting):
    """Under "auto", a block compiled without grad calls cpu_excite between its pool and its
    rescale (no addmm), and computes the reference's output."""
    compile_setting("auto")
    torch.manual_seed(0)
    ref = SaE(19, rd_channels=3, cardinality=cardinality, residual=True).eval()
    fused = FusedSaE.from_module(ref)
    x = torch.randn(3, 19, 5, 4)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    ops, out = _compiled_ops(fused, x, grad=False)
    assert _holds_excite(ops) and not any("addmm" in op for op in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)


def test_compiled_bfloat16_inference_runs_the_cpp_excitation(compile_setting):
    """bfloat16 x: cpu_excite takes the pooled means and the weights in bf16 (the
    composite's dtype rule) and returns s in bf16; the output is the float32 reference's
    within the rounding of y (2^-9 relative) and of s, z and the weights on the way (each
    2^-9 relative, times |x| < 5 here): the largest error measured is a third of this."""
    compile_setting("auto")
    torch.manual_seed(0)
    ref = SaE(19, rd_channels=3, cardinality=2, residual=True).eval()
    fused = FusedSaE.from_module(ref)
    x = torch.randn(3, 19, 5, 4).to(torch.bfloat16)
    ops, out = _compiled_ops(fused, x, grad=False)
    assert _holds_excite(ops) and out.dtype == torch.bfloat16, ops
    with torch.no_grad():
        torch.testing.assert_close(out.float(), ref(x.float()), rtol=2 ** -7, atol=2 ** -6)


@pytest.mark.parametrize("setting, grad", [("composite", False), ("auto", True)])
def test_the_aten_fcs_stay_where_the_rule_says(setting, grad, compile_setting):
    """The "composite" setting traces the ATen FCs; so does "auto" where a gradient is due
    (cpu_excite has no autograd), and the gradients are the reference's."""
    compile_setting(setting)
    torch.manual_seed(0)
    ref = SaE(19, rd_channels=3, cardinality=2).double()
    fused = FusedSaE.from_module(ref)
    x = torch.randn(2, 19, 3, 3, dtype=torch.float64, requires_grad=True)
    ops, out = _compiled_ops(fused, x, grad=grad)
    assert not _holds_excite(ops), ops
    if grad:
        out.sum().backward()
        expected = ref(x)
        expected.sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_export_traces_the_aten_fcs(compile_setting):
    """A program torch.export saves holds standard ops only, cpu_excite not among them."""
    compile_setting("auto")
    fused = FusedSaE.from_module(SaE(16, reduction=4, cardinality=2)).eval()
    with torch.no_grad():
        program = torch.export.export(fused, (torch.randn(2, 16, 5, 5),))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not _holds_excite(ops) and not any(op.startswith("sae_kernels") for op in ops), ops


def test_compiled_converted_network_equals_the_original(compile_setting):
    """A converted network compiled for inference under "auto" (every SE site through
    cpu_excite) against the original in float64."""
    compile_setting("auto")
    torch.manual_seed(0)
    model = senetv2_resnet(18, num_classes=10, fused=False, base_width=32).double().eval()
    converted, report = convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ops, out = _compiled_ops(converted, x, grad=False)
    assert _holds_excite(ops) and report.converted
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-9, atol=1e-9)
