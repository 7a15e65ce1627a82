"""y written over x: the op ``cpu_sae_`` (cpu_sae's kernels with x's memory as the output),
its stand-in, the typed entry that picks it, and the fused blocks' guard against hooks.
Which blocks may overwrite their input is convert's proof (test_convert.py)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sae_kernels import FusedSE
from sae_kernels.kernels import cpu, cpu_reference
from sae_kernels.options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels did not build")

OP, IN_PLACE = torch.ops.sae_kernels.cpu_sae, torch.ops.sae_kernels.cpu_sae_
SHAPES = [(3, 19, 5, 7), (2, 1, 3, 3), (2, 3, 1, 1), (0, 19, 4, 4), (2, 64, 9, 9)]
#: (act, gate, residual, relu_out, identity, prologue_act, single_fc)
OPTIONS = [("relu", "sigmoid", False, False, False, "none", False),
           ("silu", "sigmoid", True, True, True, "silu", False),
           ("gelu", "hardsigmoid", False, True, True, "hardswish", False),
           ("relu", "sigmoid", False, False, False, "relu", True)]


def _operands(shape, dtype, channels_last, options):
    """cpu_sae's arguments: two branches (or the single C x C FC), with what options asks."""
    act, gate, residual, relu_out, with_identity, prologue_act, single_fc = options
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1s = [torch.randn(c, c)] if single_fc else [torch.randn(2, c), torch.randn(3, c)]
    b1s = [torch.randn(w.shape[0]) for w in w1s]
    w2, b2 = (None, None) if single_fc else (torch.randn(c, 5), torch.randn(c))
    identity = torch.randn_like(x) if with_identity else None
    scale, shift = ((None, None) if prologue_act == "none" and not single_fc
                    else (torch.rand(c) + 0.5, torch.randn(c)))
    return (x, w1s, b1s, w2, b2, identity, ACTIVATIONS.index(act), GATES.index(gate), residual,
            relu_out, scale, shift, PROLOGUE_ACTIVATIONS.index(prologue_act))


def _tensors(args) -> list[torch.Tensor]:
    return [t for a in args for t in (a if isinstance(a, list) else [a])
            if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_in_place_op_writes_cpu_sae_s_result_into_x(shape, dtype, channels_last, options):
    """The same kernels, so the same bits as cpu_sae (itself checked against the reference
    in every test of the op), in x's own memory and layout; x's version moves on and no
    other operand changes."""
    args = _operands(shape, dtype, channels_last, options)
    expected = OP(*args)
    x = args[0].clone()
    others = [t.clone() for t in _tensors(args[1:])]
    version, strides, pointer = x._version, x.stride(), x.data_ptr()
    assert IN_PLACE(x, *args[1:]) is None
    assert torch.equal(x, expected)
    assert (x.stride(), x.data_ptr(), x._version) == (strides, pointer, version + 1)
    for before, after in zip(others, _tensors(args[1:]), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("shape", [(3, 19, 5, 7), (2, 1, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stand_in_writes_what_the_library_writes(shape):
    """The stand-in (no library) against the library, in float64: the same formulas, so
    only the order of the sums differs (1e-12 is ~5000 ulps of 1)."""
    args = _operands(shape, torch.float64, False, OPTIONS[1])
    library, stand_in = args[0].clone(), args[0].clone()
    IN_PLACE(library, *args[1:])
    cpu_reference.sae_in_place(stand_in, *args[1:])
    torch.testing.assert_close(stand_in, library, rtol=1e-12, atol=1e-12)


def _strided(x):
    return torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])[..., ::2]


def _expanded(x):
    return x[:1].expand_as(x)


@pytest.mark.parametrize("bad,error,message", [
    ("grad", RuntimeError, "records no gradient"),
    ("strided", ValueError, "dense NCHW or channels_last"),
    ("expanded", ValueError, "dense NCHW or channels_last"),
    ("identity is x", ValueError, "identity must not share x's memory"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("run", ["library", "stand_in"])
def test_in_place_op_refuses_what_it_cannot_do(bad, error, message, run):
    """A clear error naming the problem, and every operand left as it was."""
    if run == "stand_in" and bad != "grad":
        pytest.skip("the stand-in computes out of place and copies: any layout is fine")
    args = list(_operands((3, 19, 5, 7), torch.float32, False, OPTIONS[1]))
    x = args[0]
    if bad == "grad":
        args[1][0].requires_grad_(True)
    elif bad == "strided":
        x = _strided(x)
    elif bad == "expanded":
        x = _expanded(x)
    else:
        args[5] = x
    before = [t.detach().clone() for t in _tensors([x, *args[1:]])]
    call = IN_PLACE if run == "library" else cpu_reference.sae_in_place
    with pytest.raises(error, match=message):
        call(x, *args[1:])
    for a, b in zip(before, _tensors([x, *args[1:]]), strict=True):
        assert torch.equal(a, b)


class _Recorder(TorchDispatchMode):
    """The ops dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


needs_entry = pytest.mark.skipif(cpu.op_entry() is OP, reason="the typed entry did not build")


@needs_entry
@pytest.mark.parametrize("case", ["no_grad", "inference_mode", "grad mode", "strided",
                                  "identity is x", "traced"])
def test_entry_writes_over_x_only_where_allowed(case):
    """op_entry(overwrite_x=True) returns x itself, holding cpu_sae's result, where no
    gradient is recorded, x is dense, the shortcut is not x and no trace records the call;
    elsewhere it returns cpu_sae's new output and leaves x alone."""
    args = list(_operands((3, 19, 5, 7), torch.float32, True, OPTIONS[1]))
    x = args[0]
    if case == "strided":
        x = args[0] = _strided(x)
    if case == "identity is x":
        args[5] = x
    expected, original = OP(*args), x.clone()
    entry = cpu.op_entry(overwrite_x=True)
    if case == "traced":
        with torch.no_grad():
            traced = torch.jit.trace(lambda x: entry(x, *args[1:]), (x,), check_trace=False)
        assert "sae_kernels::cpu_sae(" in str(traced.graph)
        assert torch.equal(x, original)
        return
    context = {"grad mode": torch.enable_grad,
               "inference_mode": torch.inference_mode}.get(case, torch.no_grad)
    with context():
        if case == "inference_mode":
            x = args[0] = x.clone()  # an inference tensor may only change inside the mode
        y = entry(*args)
    assert torch.equal(y, expected)
    assert (y is x) == (case in ("no_grad", "inference_mode"))
    if y is not x:
        assert torch.equal(x, original)


@needs_entry
def test_a_block_never_overwrites_unless_told():
    """A fused block built directly (not by convert) keeps x, in every mode."""
    block = FusedSE(16, reduction=4).eval()
    x = torch.randn(2, 16, 5, 5)
    original = x.clone()
    with torch.no_grad(), _Recorder() as recorder:
        y = block(x)
    assert y is not x and torch.equal(x, original)
    assert recorder.seen == ["sae_kernels.cpu_sae.default"]
    assert "overwrites_input" not in repr(block)


class _ConvSE(nn.Module):
    """A convolution whose output only the SE reads (what convert proves)."""

    def __init__(self):
        super().__init__()
        self.conv, self.se = nn.Conv2d(8, 16, 3, padding=1), FusedSE(16, reduction=4).eval()
        self.se.overwrite_input_of([self.conv])

    def forward(self, x):
        return self.se(self.conv(x))


HOOKS = {
    "conv forward hook": lambda m, keep: m.conv.register_forward_hook(
        lambda mod, inputs, out: keep.append(out)),
    "se forward pre-hook": lambda m, keep: m.se.register_forward_pre_hook(
        lambda mod, inputs: keep.append(inputs[0])),
    "se forward hook": lambda m, keep: m.se.register_forward_hook(
        lambda mod, inputs, out: keep.append(inputs[0])),
    "global forward hook": lambda m, keep: nn.modules.module.register_module_forward_hook(
        lambda mod, inputs, out: keep.append(out) if mod is m.conv else None),
}


@needs_entry
@pytest.mark.parametrize("hook", [None, *HOOKS])
def test_hooks_that_could_hold_x_keep_it_intact(hook):
    """With a producer: the op writes over the convolution's output, unless a hook on the
    block, on a producer or global could hold it; then what the hook holds stays the
    convolution's output. Either way the block computes what it computes on a copy."""
    model = _ConvSE()
    x = torch.randn(2, 8, 5, 5)
    kept = []
    handle = HOOKS[hook](model, kept) if hook else None
    try:
        with torch.no_grad(), _Recorder() as recorder:
            y = model(x)
    finally:
        if handle is not None:
            handle.remove()
    conv_out = model.conv(x).detach()
    torch.testing.assert_close(y, model.se(conv_out.clone()), rtol=0, atol=0)
    op = "sae_kernels.cpu_sae_.default" if hook is None else "sae_kernels.cpu_sae.default"
    assert op in recorder.seen
    for t in kept:
        assert torch.equal(t, conv_out)
    assert "overwrites_input=True" in repr(model.se)


@needs_entry
@pytest.mark.parametrize("shape,channels_last", [((3, 19, 5, 7), True), ((2, 3, 1, 1), False),
                                                 ((2, 1, 4, 4), True), ((0, 19, 4, 4), False)])
def test_a_block_told_so_writes_over_x_in_every_layout(shape, channels_last):
    """Odd shapes and both layouts: the block returns x holding what a block that keeps x
    returns, bit for bit."""
    block = FusedSE(shape[1], rd_channels=2).eval()
    keeper = copy.deepcopy(block)
    block.overwrite_input_of([nn.Identity()])
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = keeper(x)
        y = block(x)
    assert y is x and torch.equal(y, expected)


def test_flop_counter_counts_the_in_place_op_as_cpu_sae():
    """FlopCounterMode sees the same matrix products in cpu_sae_ as in cpu_sae."""
    args = _operands((3, 19, 5, 7), torch.float32, False, OPTIONS[0])
    counts = []
    for op, x in ((OP, args[0]), (IN_PLACE, args[0].clone())):
        with FlopCounterMode(display=False) as counter:
            op(x, *args[1:])
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
