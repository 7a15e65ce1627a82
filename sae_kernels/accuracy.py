"""The accuracy contract of the fused operator, against the float64 reference.

The kernels accumulate in fp32 (fp64 for fp64 I/O) and round once when storing; the
truth is the reference evaluated in float64 on exactly the same input values. An
element of any output or gradient may differ from the truth by at most
``rtol * |truth| + atol * max|truth|``, where
- rtol covers the rounding at the store (eps/2 relative on a GPU, which rounds to
  nearest; up to eps on the CPU, where Triton's interpreter converts fp32 to bf16 by
  truncation) and the accumulation: sums over up to H*W = 3136 terms (pool, ds) with
  cancellation, then GEMVs over C. At fp32 that costs up to ~1e-5 relative (hundreds of
  ulps: n * eps * sum|terms| / |sum|), at fp64 ~1e-12; for fp16/bf16 it is far below
  their rounding, so their rtol is one eps (twice the rounding alone);
- atol (times the tensor's largest magnitude, a fraction of eps) covers gradients that
  are sums over the batch (dW, db) or that cancel (dx = g*s + dz/HW): they lose relative
  accuracy on elements far below the tensor's largest. A sum over the batch can also
  cancel as a whole (a bias gradient of one element, two samples' terms of 1.91 and
  -1.91 summing to -5.6e-4): its rounding follows the terms, not the sum, so for such
  gradients the magnitude atol applies to is the larger of the tensor's and its largest
  per-sample term's (``scale``).
"""

import torch

#: dtype -> (rtol, atol as a fraction of max |truth|)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (2.0**-40, 2.0**-42),
    torch.float32: (2.0**-16, 2.0**-18),
    torch.float16: (2.0**-10, 2.0**-13),
    torch.bfloat16: (2.0**-7, 2.0**-10),
}


def error_ratio(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                scale: float = 0.0) -> torch.Tensor:
    """Elementwise |actual - truth| / bound, in float64 on truth's device; <= 1 passes.
    ``scale``: for a sum over the batch, the largest magnitude of its per-sample terms."""
    rtol, atol = TOLERANCES[dtype]
    a, t = actual.detach().double().to(truth.device), truth.detach().double()
    scale = max(t.abs().max().item() if t.numel() else 0.0, scale)
    bound = rtol * t.abs() + atol * scale
    err = (a - t).abs()
    # an exact match is within any bound, including a zero one
    return torch.where(err == 0, torch.zeros_like(err), err / bound)
