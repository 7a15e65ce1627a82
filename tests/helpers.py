"""Shared test machinery: build a case, run fused and float64 reference, compare."""

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from sae_kernels import FusedSaE, SaE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Error model behind the tolerances. The fused kernels accumulate in fp32 (fp64 for
# fp64 I/O) and round once when storing; the truth is the reference module evaluated
# in float64 on exactly the same input values (inputs, weights and upstream gradient).
# - Rounding at the store: at most eps/2 relative (eps: the I/O dtype's epsilon).
# - Accumulation: sums over up to H*W = 3136 terms (pool, ds) with cancellation, then
#   GEMVs over C, feed every gate and gradient. At fp32 that costs up to ~1e-5 relative
#   (hundreds of ulps: n * eps * sum|terms| / |sum|); at fp64 ~1e-12; for fp16/bf16 it
#   is far below their rounding, so their rtol is one eps (2x the rounding alone).
# - Gradients that are sums over the batch (dW, db) or that cancel (dx = g*s + dz/HW)
#   lose relative accuracy on elements far below the tensor's largest: an absolute term
#   scaled by the tensor's max magnitude, a fraction of eps, covers them.
# The largest errors seen over the whole matrix are 3-10x below these bounds.
#                  rtol        atol (times max |truth|)
TOLERANCES = {
    torch.float64: (2.0**-40, 2.0**-42),
    torch.float32: (2.0**-16, 2.0**-18),
    torch.float16: (2.0**-10, 2.0**-13),
    torch.bfloat16: (2.0**-7, 2.0**-10),
}


#: Largest error/bound ratio seen per dtype in this process (reported by conftest).
WORST: dict = {}


def assert_close_to_truth(name: str, actual: torch.Tensor, truth: torch.Tensor,
                          dtype: torch.dtype, record: bool = True) -> None:
    """|actual - truth| <= rtol * |truth| + atol * max|truth|, elementwise."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    rtol, atol = TOLERANCES[dtype]
    a, t = actual.detach().double(), truth.detach().double()
    scale = t.abs().max().item() if t.numel() else 0.0
    err = (a - t).abs()
    bound = rtol * t.abs() + atol * scale
    if record and t.numel():
        WORST[dtype] = max(WORST.get(dtype, 0.0), (err / bound.clamp_min(1e-300)).max().item())
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{t.numel()} elements off; first at flat index "
            f"{i}: got {a.flatten()[i].item():.9g}, truth {t.flatten()[i].item():.9g}, "
            f"bound {bound.flatten()[i].item():.3g}; max err {err.max().item():.3g}"
        )


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    cardinality: int = 2
    rd_channels: Optional[int] = None
    act: str = "relu"
    gate: str = "sigmoid"
    bias: bool = True
    residual: bool = False
    with_identity: bool = False
    act_out: str = "none"
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    #: dtype of the weights; None means the I/O dtype (autocast-style fp32 otherwise)
    weight_dtype: Optional[torch.dtype] = None
    strategy: str = "auto"
    seed: int = 0


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if channels_last else t


def check_case(case: Case) -> None:
    """Fused (Triton) vs float64 reference: output, dx, d_identity and every parameter grad."""
    gen = torch.Generator().manual_seed(case.seed)
    rd = case.rd_channels or max(1, case.c // 4)
    ref = SaE(case.c, cardinality=case.cardinality, rd_channels=rd, act=case.act, gate=case.gate,
              bias=case.bias, residual=case.residual, act_out=case.act_out)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    shape = (case.n, case.c, case.h, case.w)
    # a per-(sample, channel) offset keeps the pooled means away from zero
    x = torch.randn(shape, generator=gen) + torch.randn(shape[:2] + (1, 1), generator=gen)
    identity = torch.randn(shape, generator=gen) if case.with_identity else None
    grad = torch.randn(shape, generator=gen)

    weight_dtype = case.weight_dtype or case.dtype
    fused = FusedSaE.from_module(ref, backend="triton", strategy=case.strategy)
    fused = fused.to(DEVICE, weight_dtype)
    truth_module = copy.deepcopy(fused).double()  # the same (rounded) weight values
    truth_module.backend = "reference"

    def leaf(t, dtype, device):
        return _layout(t.to(dtype), case.channels_last).to(device).detach().requires_grad_(True)

    xq = leaf(x, case.dtype, DEVICE)
    iq = leaf(identity, case.dtype, DEVICE) if identity is not None else None
    # the truth sees exactly the values the kernels see
    x64 = leaf(xq.detach().cpu(), torch.float64, "cpu")
    i64 = leaf(iq.detach().cpu(), torch.float64, "cpu") if iq is not None else None
    truth_module = truth_module.cpu()
    gq = _layout(grad.to(case.dtype), case.channels_last).to(DEVICE)

    y = fused(xq, iq)
    assert y.dtype == case.dtype and y.shape == xq.shape
    if case.channels_last and case.c > 1 and case.h * case.w > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(gq)
    y64 = truth_module(x64, i64)
    y64.backward(gq.double().cpu())

    d = case.dtype
    assert_close_to_truth("y", y.cpu(), y64, d)
    assert xq.grad.dtype == case.dtype
    assert_close_to_truth("dx", xq.grad.cpu(), x64.grad, d)
    if iq is not None:
        assert_close_to_truth("d_identity", iq.grad.cpu(), i64.grad, d)
    for (name, p), p64 in zip(fused.named_parameters(), truth_module.parameters()):
        assert p.grad is not None and p.grad.dtype == weight_dtype, name
        assert_close_to_truth(f"grad {name}", p.grad.cpu(), p64.grad, weight_dtype)
