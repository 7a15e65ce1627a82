"""Bad input: a clear TypeError/ValueError naming the problem, never a kernel crash."""

import pytest
import torch

from helpers import DEVICE
from sae_kernels import SE, FusedSaE, FusedSE, SaE, functional, sae
from sae_kernels.kernels import cpu as cpu_kernels


def _operands(n=2, c=8, k=4):
    x = torch.randn(n, c, 5, 5, device=DEVICE)
    return [x, torch.randn(k, c, device=DEVICE), torch.randn(k, device=DEVICE),
            torch.randn(c, k, device=DEVICE), torch.randn(c, device=DEVICE)]


def _skip_without_cpu_kernels():
    if DEVICE.type != "cpu" or not cpu_kernels.available():
        pytest.skip("needs the C++ CPU kernels")


def _call(args, **kwargs):
    return sae(*args, **{"backend": "triton", **kwargs})


def _call_cpu(args, **kwargs):
    """The functional on the C++ kernels, which leaves the operand checks to the op until
    the op fails; the problem must still be named in the functional's words."""
    _skip_without_cpu_kernels()
    return sae(*args, **{"backend": "cpu", **kwargs})


def _cpu_op(args, identity=None):
    """The C++ op, which checks its operands itself (the layers call it directly)."""
    _skip_without_cpu_kernels()
    x, w1, b1, w2, b2 = args
    return torch.ops.sae_kernels.cpu_sae(x, [w1], [b1], w2, b2, identity, 0, 0, False, False)


#: The entries that check operands: the functional on the Triton kernels (the Python
#: checks first) and on the C++ kernels, and the C++ op itself.
ENTRIES = {"functional": _call, "functional_cpu": _call_cpu, "cpu_op": _cpu_op}


@pytest.mark.parametrize("index, value, error, message", [
    (0, torch.randn(8, 5, 5), ValueError, "must be 4-D"),
    (0, torch.randn(2, 8, 5, 5, 1), ValueError, "must be 4-D"),
    (0, torch.randn(2, 7, 5, 5), ValueError, "fc1_weight must have shape \\(K, C=7\\)"),
    (0, torch.ones(2, 8, 5, 5, dtype=torch.int32), TypeError, "x must be float16"),
    (0, torch.ones(2, 8, 5, 5, dtype=torch.bool), TypeError, "x must be float16"),
    (0, torch.randn(2, 8, 0, 5), ValueError, "spatial size H\\*W >= 1"),
    (0, [[1.0]], TypeError, "x must be a torch.Tensor"),
    (1, torch.randn(4, 9), ValueError, "fc1_weight must have shape \\(K, C=8\\)"),
    (1, torch.randn(0, 8), ValueError, "at least one row"),
    (1, torch.ones(4, 8, dtype=torch.int64), TypeError, "fc1_weight must be float16"),
    (2, torch.randn(5), ValueError, "fc1_bias must have shape \\(4,\\)"),
    (3, torch.randn(8, 5), ValueError, "fc2_weight must have shape \\(C=8, K=4\\)"),
    (4, torch.randn(7), ValueError, "fc2_bias must have shape \\(8,\\)"),
])
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_operand(entry, index, value, error, message):
    args = _operands()
    if isinstance(value, torch.Tensor):
        value = value.to(DEVICE)
    elif entry == "cpu_op":
        pytest.skip("the op's schema rejects non-tensors itself")
    args[index] = value
    with pytest.raises(error, match=message):
        ENTRIES[entry](args)


def _branches(*rows, c=8):
    return [torch.randn(r, c, device=DEVICE) for r in rows]


@pytest.mark.parametrize("weights, biases, error, message", [
    ([], None, ValueError, "at least one branch matrix"),
    (_branches(2, 2) + [_branches(4, c=9)[0]], None, ValueError,
     r"fc1_weight\[2\] must have shape \(K_i, C=8\)"),
    (_branches(2, 2) + [torch.randn(0, 8)], None, ValueError,
     r"fc1_weight\[2\] must have at least one row"),
    (_branches(2, 2) + ["w"], None, TypeError, r"fc1_weight\[2\] must be a torch.Tensor"),
    (_branches(2, 2), [torch.randn(2)], ValueError, "one per branch matrix: 1 biases for 2"),
    (_branches(2, 2), torch.randn(4), ValueError, "one per branch matrix: 1 biases for 2"),
    (_branches(2, 2), [torch.randn(2), torch.randn(3)], ValueError,
     r"fc1_bias\[1\] must have shape \(2,\)"),
    (_branches(2, 3), None, ValueError, r"fc2_weight must have shape \(C=8, K=5\)"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_branch_matrices(weights, biases, error, message, backend):
    """fc1 given as its branch matrices: each is named by its index."""
    if backend == "cpu":
        _skip_without_cpu_kernels()
    x, _, _, w2, b2 = _operands()
    weights = [w.to(DEVICE) if isinstance(w, torch.Tensor) else w for w in weights]
    with pytest.raises(error, match=message):
        sae(x, weights, biases, w2, b2, backend=backend)


@pytest.mark.parametrize("entry", ENTRIES)
def test_single_fc_form_rules(entry):
    """Without fc2_weight: fc1 must be C x C and there is no fc2 bias."""
    x, w1, b1, _, b2 = _operands(k=8)
    call = ENTRIES[entry]
    with pytest.raises(ValueError, match="fc2_bias must be None when fc2_weight is None"):
        call([x, w1, b1, None, b2])
    x, w1, b1, _, _ = _operands(k=4)
    with pytest.raises(ValueError, match="the single-FC form\\) fc1_weight must have shape "
                                         "\\(C=8, C=8\\), got \\(4, 8\\)"):
        call([x, w1, b1, None, None])


@pytest.mark.parametrize("entry", ENTRIES)
def test_identity_of_wrong_shape_or_dtype(entry):
    args = _operands()
    call = ENTRIES[entry]
    with pytest.raises(ValueError, match="identity must have x's shape"):
        call(args, identity=torch.randn(2, 8, 5, 4, device=DEVICE))
    with pytest.raises(TypeError, match="identity must have x's dtype"):
        call(args, identity=torch.randn(2, 8, 5, 5, device=DEVICE, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_operands_on_different_devices():
    args = _operands()
    args[1] = args[1].cpu()
    with pytest.raises(ValueError, match="fc1_weight is on cpu but x is on cuda"):
        _call(args)


@pytest.mark.parametrize("entry", ENTRIES)
def test_operands_on_meta_and_cpu(entry):
    args = _operands()
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="fc2_weight is on meta but x is on"):
        ENTRIES[entry](args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(act="tanh"), "unknown act 'tanh'"),
    (dict(gate="softmax"), "unknown gate 'softmax'"),
    (dict(act_out="gelu"), "unknown act_out 'gelu'"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(strategy="fast"), "unknown strategy 'fast'"),
])
@pytest.mark.parametrize("entry", ["functional", "functional_cpu"])
def test_unknown_option(kwargs, message, entry):
    with pytest.raises(ValueError, match=message):
        ENTRIES[entry](_operands(), **kwargs)


def test_a_good_call_on_the_cpu_kernels_skips_the_python_checks(monkeypatch):
    """They cost 4 us of a 1 x 64 x 1 x 1 call's 10 (benchmarks/call_cost.py), and the op
    makes them itself."""
    _skip_without_cpu_kernels()
    args = _operands()
    expected = sae(*args, backend="reference")

    def checked(*operands):
        raise AssertionError("the Python operand checks ran on a good call")

    monkeypatch.setattr(functional, "check_operands", checked)
    torch.testing.assert_close(sae(*args), expected)


@pytest.mark.parametrize("cls", [SaE, FusedSaE])
@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=8, reduction=0), "reduction must be >= 1"),
    (dict(channels=8, reduction=16), "reduced width channels // reduction = 8 // 16 is 0"),
    (dict(channels=8, rd_channels=0), "rd_channels must be >= 1"),
    (dict(channels=0), "channels must be >= 1"),
    (dict(channels=8, reduction=2, cardinality=0), "cardinality must be >= 1"),
    (dict(channels=8, reduction=2, act="tanh"), "unknown act"),
    (dict(channels=8, reduction=2, gate="tanh"), "unknown gate"),
    (dict(channels=8, reduction=2, act_out="silu"), "unknown act_out"),
])
def test_bad_module_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_bad_fused_module_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        FusedSaE(8, reduction=2, backend="gpu")
    with pytest.raises(ValueError, match="unknown strategy"):
        FusedSE(8, reduction=2, strategy="fast")


@pytest.mark.parametrize("cls, backend", [(SaE, None), (FusedSaE, "triton"), (FusedSaE, "auto")])
def test_module_channel_mismatch(cls, backend):
    block = (cls(8, reduction=2) if backend is None else cls(8, reduction=2, backend=backend))
    block = block.to(DEVICE)
    with pytest.raises(ValueError, match="x has 6 channels|has 8 channels"):
        block(torch.randn(2, 6, 4, 4, device=DEVICE))


def test_from_module_checks_its_argument():
    with pytest.raises(TypeError, match="expects an SaE or SE module"):
        FusedSaE.from_module(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="single-branch"):
        FusedSE.from_module(SaE(8, reduction=2, cardinality=2))
    assert isinstance(FusedSE.from_module(SE(8, reduction=2)), FusedSE)
