"""The autocast policy: autocast casts nothing for the operator (as for batch_norm and
pooling). It runs in x's dtype with fp32 accumulation and the weights as they are, and
returns x's dtype; the reference block under autocast, whose FCs autocast runs in bf16,
agrees within bf16 rounding."""

import pytest
import torch
from torch.func import vmap

from sae_kernels import FusedSaE, SaE, sae, sae_reference
from sae_kernels.kernels import cpu as cpu_kernels

BF16 = torch.bfloat16
EPS = torch.finfo(BF16).eps  # 2^-7
#: Both round y to bf16 once (or not at all, for fp32 x); the reference also rounds s and
#: the FCs' operands to bf16. Relative to the largest output: a shortcut added after the
#: rescale can cancel x * s, so elementwise relative bounds mean nothing there.
OUTPUT_TOLERANCE = EPS
#: The reference's backward runs the FC gradients in bf16 too (a few roundings of every
#: operand), relative to the largest gradient.
GRAD_TOLERANCE = 4 * EPS

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C++ CPU kernels")


def _blocks(**options) -> tuple[SaE, FusedSaE]:
    torch.manual_seed(0)
    reference = SaE(64, reduction=8, cardinality=2, act="silu", **options)
    return reference, FusedSaE.from_module(reference)


def _activations(dtype: torch.dtype, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x as a conv hands it over under autocast (bf16) or outside it (fp32), and a
    shortcut of the same dtype."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(n, 64, 9, 9, generator=generator).to(dtype),
            torch.randn(n, 64, 9, 9, generator=generator).to(dtype))


def _assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, tolerance: float,
                         name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
    bound = tolerance * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=bound, msg=name)


def _run(block, x, identity=None, grad=None, autocast=True) -> dict[str, torch.Tensor]:
    """Output and, given ``grad``, the gradients of x and every parameter."""
    x = x.clone().requires_grad_(grad is not None)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y = block(x) if identity is None else block(x, identity)
    results = {"y": y.detach()}
    if grad is not None:
        block.zero_grad()
        y.backward(grad)
        results |= {"dx": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    return results


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32_x", "bf16_x"])
def test_autocast_changes_nothing_in_the_fused_op(dtype):
    """Same bits with and without autocast, gradients included: fp32 x stays fp32, bf16 x
    with the fp32 weights stays bf16, the weights' gradients stay fp32."""
    _, fused = _blocks(residual=True)
    x, _ = _activations(dtype)
    grad = torch.randn_like(x)
    under, outside = _run(fused, x, grad=grad), _run(fused, x, grad=grad, autocast=False)
    assert under["y"].dtype == under["dx"].dtype == dtype
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters())
    for name in under:
        assert torch.equal(under[name], outside[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32_x", "bf16_x"])
def test_agrees_with_the_reference_under_autocast(dtype):
    reference, fused = _blocks(residual=True)
    x, _ = _activations(dtype)
    grad = torch.randn_like(x)
    expected, actual = _run(reference, x, grad=grad), _run(fused, x, grad=grad)
    _assert_close_to_max(actual.pop("y"), expected.pop("y"), OUTPUT_TOLERANCE, "y")
    for name, value in actual.items():
        _assert_close_to_max(value, expected[name], GRAD_TOLERANCE, name)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32_x", "bf16_x"])
def test_block_tail_agrees_with_the_reference_under_autocast(dtype):
    """``relu(x * s + identity)``: outputs only, since where the sum is near 0 the two
    roundings put the ReLU's kink on different sides and the gradients differ by design."""
    reference, fused = _blocks(act_out="relu")
    x, identity = _activations(dtype)
    _assert_close_to_max(_run(fused, x, identity)["y"], _run(reference, x, identity)["y"],
                         OUTPUT_TOLERANCE, "y")


def test_prologue_under_autocast():
    """bf16 x with the fp32 prologue (an absorbed BatchNorm's affine) and fp32 weights."""
    generator = torch.Generator().manual_seed(2)
    x, identity = _activations(BF16, n=2)
    operands = [torch.randn(*shape, generator=generator) / 4
                for shape in ((16, 64), (16,), (64, 16), (64,))]
    scale, shift = 1 + torch.rand(64, generator=generator), torch.randn(64, generator=generator)
    with torch.autocast("cpu", dtype=BF16):
        actual, expected = (fn(x, *operands, identity, act="relu", gate="hardsigmoid",
                               prologue_scale=scale, prologue_shift=shift, prologue_act="silu")
                            for fn in (sae, sae_reference))
    _assert_close_to_max(actual, expected, OUTPUT_TOLERANCE, "y")


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32_x", "bf16_x"])
def test_the_composite_follows_the_same_rule(dtype):
    """Where a call runs as the ATen composite (here under vmap), autocast casts nothing
    either (same bits with and without it) and the fp32 weights meet x's dtype: x's dtype
    out, within bf16 rounding of the fused op."""
    _, fused = _blocks(residual=True)
    x, _ = _activations(dtype)
    with torch.no_grad():
        outside = vmap(fused)(x.unflatten(0, (2, 2))).flatten(0, 1)
        with torch.autocast("cpu", dtype=BF16):
            under = vmap(fused)(x.unflatten(0, (2, 2))).flatten(0, 1)
            direct = fused(x)
    assert torch.equal(under, outside)
    _assert_close_to_max(under, direct, OUTPUT_TOLERANCE, "y")
