"""Shared test machinery: build a case, run fused and float64 reference, compare."""

import copy
from dataclasses import dataclass

import torch

from sae_kernels import EffectiveSE, FusedEffectiveSE, FusedSaE, SaE
from sae_kernels.accuracy import error_ratio

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Largest error / bound seen over the whole matrix on CPU: fp32 0.38, fp16 0.42,
# bf16 0.85 (the interpreter's truncation to bf16, see sae_kernels.accuracy), fp64 0.002.


#: The operator's output epilogues: (residual, with_identity, act_out).
EPILOGUES = {
    "scale": (False, False, "none"),
    "residual": (True, False, "none"),
    "relu": (False, False, "relu"),
    "identity": (False, True, "none"),
    "identity_relu": (False, True, "relu"),
    "residual_identity_relu": (True, True, "relu"),
}
#: Layouts by name: whether channels_last.
LAYOUTS = {"nchw": False, "channels_last": True}
#: The dtypes of the matrix by name.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}

#: Largest error/bound ratio seen per dtype in this process (reported by conftest).
WORST: dict = {}


def assert_close_to_truth(name: str, actual: torch.Tensor, truth: torch.Tensor,
                          dtype: torch.dtype, record: bool = True, scale: float = 0.0) -> None:
    """Within the accuracy contract of ``sae_kernels.accuracy``, elementwise (``scale``: a
    batch sum's largest per-sample term)."""
    assert actual.shape == truth.shape, f"{name}: {tuple(actual.shape)} != {tuple(truth.shape)}"
    ratio = error_ratio(actual, truth, dtype, scale)
    if record and ratio.numel():
        WORST[dtype] = max(WORST.get(dtype, 0.0), ratio.max().item())
    bad = ~(ratio <= 1)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        got, want = actual.flatten()[i].item(), truth.flatten()[i].item()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{truth.numel()} elements off; first at flat "
            f"index {i}: got {got:.9g}, truth {want:.9g}, error/bound {ratio.flatten()[i]:.3g}"
        )


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    cardinality: int = 2
    rd_channels: int | None = None
    act: str = "relu"
    gate: str = "sigmoid"
    bias: bool = True
    residual: bool = False
    with_identity: bool = False
    act_out: str = "none"
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    #: dtype of the weights; None means the I/O dtype (autocast-style fp32 otherwise)
    weight_dtype: torch.dtype | None = None
    strategy: str = "auto"
    backend: str = "triton"
    seed: int = 0
    #: the single-FC form (EffectiveSE: one C -> C FC; no act, epilogue x * s)
    single_fc: bool = False


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if channels_last else t


def check_case(case: Case) -> None:
    """Fused (``case.backend``) vs float64 reference: output, dx, d_identity and every
    parameter gradient."""
    gen = torch.Generator().manual_seed(case.seed)
    rd = case.rd_channels or max(1, case.c // 4)
    if case.single_fc:
        ref = EffectiveSE(case.c, gate=case.gate, bias=case.bias)
        fused_type = FusedEffectiveSE
    else:
        ref = SaE(case.c, cardinality=case.cardinality, rd_channels=rd, act=case.act,
                  gate=case.gate, bias=case.bias, residual=case.residual, act_out=case.act_out)
        fused_type = FusedSaE
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    shape = (case.n, case.c, case.h, case.w)
    # a per-(sample, channel) offset keeps the pooled means away from zero
    x = torch.randn(shape, generator=gen) + torch.randn(shape[:2] + (1, 1), generator=gen)
    identity = torch.randn(shape, generator=gen) if case.with_identity else None
    grad = torch.randn(shape, generator=gen)

    weight_dtype = case.weight_dtype or case.dtype
    device = torch.device("cpu") if case.backend == "cpu" else DEVICE
    fused = fused_type.from_module(ref, backend=case.backend, strategy=case.strategy)
    fused = fused.to(device, weight_dtype)
    truth_module = copy.deepcopy(fused).double()  # the same (rounded) weight values
    truth_module.backend = "reference"

    def leaf(t, dtype, device):
        return _layout(t.to(dtype), case.channels_last).to(device).detach().requires_grad_(True)

    xq = leaf(x, case.dtype, device)
    iq = leaf(identity, case.dtype, device) if identity is not None else None
    # the truth sees exactly the values the kernels see
    x64 = leaf(xq.detach().cpu(), torch.float64, "cpu")
    i64 = leaf(iq.detach().cpu(), torch.float64, "cpu") if iq is not None else None
    truth_module = truth_module.cpu()
    gq = _layout(grad.to(case.dtype), case.channels_last).to(device)

    y = fused(xq) if case.single_fc else fused(xq, iq)
    assert y.dtype == case.dtype and y.shape == xq.shape
    if case.channels_last and case.c > 1 and case.h * case.w > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(gq)
    y64 = truth_module(x64) if case.single_fc else truth_module(x64, i64)
    y64.backward(gq.double().cpu())

    d = case.dtype
    assert_close_to_truth("y", y.cpu(), y64, d)
    assert xq.grad.dtype == case.dtype
    assert_close_to_truth("dx", xq.grad.cpu(), x64.grad, d)
    if iq is not None:
        assert_close_to_truth("d_identity", iq.grad.cpu(), i64.grad, d)
    terms = _per_sample_term_scales(truth_module, x64, i64, gq.double().cpu(), case.single_fc)
    for (name, p), p64, term in zip(fused.named_parameters(), truth_module.parameters(), terms,
                                    strict=True):
        assert p.grad is not None and p.grad.dtype == weight_dtype, name
        assert_close_to_truth(f"grad {name}", p.grad.cpu(), p64.grad, weight_dtype, scale=term)


def _per_sample_term_scales(module, x64, i64, g64, single_fc: bool) -> list[float]:
    """Per parameter, the largest magnitude of any one sample's gradient: the terms the
    batch's parameter gradient sums (float64 reference, one sample at a time)."""
    scales = [0.0 for _ in module.parameters()]
    for n in range(x64.shape[0]):
        xn = x64.detach()[n:n + 1]
        args = (xn,) if single_fc else (xn, i64.detach()[n:n + 1] if i64 is not None else None)
        grads = torch.autograd.grad(module(*args), list(module.parameters()), g64[n:n + 1],
                                    allow_unused=True)
        scales = [max(s, g.abs().max().item() if g is not None else 0.0)
                  for s, g in zip(scales, grads, strict=True)]
    return scales
