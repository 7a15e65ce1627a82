"""The reference modules and the swap-in layers: structure, state_dict, conversion."""

import pytest
import torch

from helpers import DEVICE
from sae_kernels import SE, FusedSaE, FusedSE, SaE, sae, sae_reference
from sae_kernels.kernels import cpu as cpu_kernels


def test_sae_is_its_branches_concatenated():
    """The stacked-weight composite equals the paper's branch-by-branch module."""
    torch.manual_seed(0)
    block = SaE(32, reduction=8, cardinality=4, act="silu", residual=True)
    x = torch.randn(3, 32, 6, 5)
    h = torch.cat([torch.nn.functional.silu(b(x.mean((2, 3)))) for b in block.branches], 1)
    s = torch.sigmoid(block.excite(h))[:, :, None, None]
    torch.testing.assert_close(block(x), x + x * s)
    w1, b1 = block.stacked_fc1()
    assert w1.shape == (16, 32)
    torch.testing.assert_close(
        sae_reference(x, w1, b1, block.excite.weight, block.excite.bias, act="silu",
                      residual=True), block(x))


def test_se_is_sae_with_one_branch():
    se = SE(64)
    assert se.cardinality == 1 and se.rd_channels == 4 and len(se.branches) == 1
    assert SaE(64).rd_channels == 2 and SaE(64).cardinality == 4  # the paper's defaults


def test_state_dict_is_shared_both_ways():
    ref = SaE(24, reduction=4, cardinality=3, bias=False)
    fused = FusedSaE(24, reduction=4, cardinality=3, bias=False)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fused.named_parameters()]
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 24, 4, 4)
    torch.testing.assert_close(FusedSaE.from_module(ref, backend="reference")(x), ref(x),
                               rtol=0, atol=0)


@pytest.mark.parametrize("cls, ref_cls", [(FusedSaE, SaE), (FusedSE, SE)])
def test_from_module_copies_everything(cls, ref_cls):
    ref = ref_cls(32, reduction=4, act="hardswish", gate="hardsigmoid", act_out="relu")
    ref = ref.to(DEVICE, torch.float64).eval()
    fused = cls.from_module(ref, backend="triton", strategy="split")
    assert type(fused) is cls and not fused.training
    assert fused.config() == ref.config()
    assert fused.backend == "triton" and fused.strategy == "split"
    for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
        assert a.dtype == torch.float64 and a.device == b.device
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    x = torch.randn(2, 32, 5, 5, device=DEVICE, dtype=torch.float64)
    identity = torch.randn_like(x)
    torch.testing.assert_close(fused(x, identity), ref(x, identity))


def test_layers_describe_themselves():
    text = repr(FusedSaE(64, act="gelu", backend="triton"))
    assert "rd_channels=2" in text and "act=gelu" in text and "backend=triton" in text


def test_empty_batch():
    fused = FusedSaE(8, reduction=2, backend="triton").to(DEVICE)
    x = torch.randn(0, 8, 3, 3, device=DEVICE, requires_grad=True)
    y = fused(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in fused.parameters())


def test_inference_reuses_stacked_weights_until_they_change():
    fused = FusedSaE(16, reduction=4, cardinality=4, backend="reference")
    ref = SaE(16, reduction=4, cardinality=4)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        fused(x)
        first = fused._fc1_cache[1]
        fused(x)
        assert fused._fc1_cache[1] is first
        for branch in fused.branches:  # an optimizer-style in-place update
            branch.weight.mul_(2)
        for branch in ref.branches:
            branch.weight.mul_(2)
        torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)
        assert fused._fc1_cache[1] is not first
        fused.load_state_dict(SaE(16, reduction=4, cardinality=4).state_dict())
        ref.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_branch_matrices_in_place_equal_the_stacked_form(backend):
    """``sae`` with fc1 as its branch matrices (and one bias each) gives the stacked
    form's output, and each branch the matching rows of the stacked gradient."""
    if backend == "cpu" and (DEVICE.type != "cpu" or not cpu_kernels.available()):
        pytest.skip("needs the C++ CPU kernels")
    torch.manual_seed(0)
    x = torch.randn(3, 19, 4, 5, device=DEVICE, dtype=torch.float64)
    weights = [torch.randn(rows, 19, device=DEVICE, dtype=torch.float64) for rows in (2, 3, 1)]
    biases = [torch.randn(len(w), device=DEVICE, dtype=torch.float64) for w in weights]
    w2 = torch.randn(19, 6, device=DEVICE, dtype=torch.float64)
    grad = torch.randn_like(x)
    results = []
    for stacked in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, *weights, *biases, w2)]
        xl, w1s, b1s, w2l = leaves[0], leaves[1:4], leaves[4:7], leaves[7]
        fc1 = (torch.cat(w1s), torch.cat(b1s)) if stacked else (w1s, b1s)
        y = sae(xl, *fc1, w2l, None, act="silu", residual=True, backend=backend)
        y.backward(grad)
        results.append([y, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _compiled_ops(module, *args) -> tuple[list, torch.Tensor]:
    """The ops of the graphs torch.compile records of ``module(*args)``, less the casts to
    the dtype a tensor already has and the graph-free queries of the dispatch, and the
    compiled module's output."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=record)(*args)
    return [node for gm in graphs for node in gm.graph.nodes
            if node.op in ("call_function", "call_method") and node.target != "to"
            and not str(getattr(node.target, "__name__", node.target)).startswith("_")
            and node.target is not getattr], out


def test_compiled_block_reads_the_branch_matrices_in_place():
    """The graph torch.compile records of a converted SaE block is the original's, op for
    op (inductor then generates the same kernels, forward and backward): it concatenates
    the branches' activations (N x K), never their weights (a copy of W1 per call)."""
    torch.manual_seed(0)
    reference = SaE(32, reduction=8, cardinality=4, residual=True, act_out="relu")
    fused = FusedSaE(32, reduction=8, cardinality=4, residual=True, act_out="relu")
    fused.load_state_dict(reference.state_dict())
    x, identity = torch.randn(2, 32, 3, 3), torch.randn(2, 32, 3, 3)
    ops, out = _compiled_ops(fused, x, identity)
    reference_ops, reference_out = _compiled_ops(reference, x, identity)
    torch.testing.assert_close(out, reference_out)
    assert sorted(map(str, (n.target for n in ops))) == sorted(
        map(str, (n.target for n in reference_ops)))
    cats = [node for node in ops if node.target is torch.cat]
    assert cats, "the branches' outputs are concatenated"
    for node in cats:
        assert tuple(node.meta["example_value"].shape) == (2, 16), node.format_node()
