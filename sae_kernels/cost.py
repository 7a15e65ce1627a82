"""The analytic cost of one call of the operator: FLOPs and the bytes it must move.

The operator is bound by memory, not arithmetic: per call it reads and writes tensors of
N*C*H*W elements while its matrix products are N*K*C multiply-adds. Both are counted
here so that a benchmark can quote achieved bandwidth and state what its FLOPs include.

FLOPs:
    matmul      the FC products, 2*M*N*K each, as ``torch.utils.flop_counter`` counts
                them (the backward costs twice the forward: input and weight gradients);
    elementwise the pool (one add per element of x), the rescale (one multiply per
                element) and, in the backward, ``sum_hw(g*x)`` (two per element) and
                ``dx = g*s + dz/HW`` (two per element); act and gate on the (N, K) and
                (N, C) vectors are counted as one each.

Bytes (``compulsory_bytes``): what any implementation must move through memory at the
least: the forward reads x and writes y once; the backward reads g and x (for
``sum_hw(g*x)``) and writes dx once; the weights are read once per pass and their
gradients written once. ``x.clone()`` plus the FCs (the benchmarks' floor) moves these
bytes in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass


def fc_flops(n: int, c: int, k: int, single_fc: bool = False) -> int:
    """The matrix-product FLOPs of one forward over N samples: FC1 (K x C) and FC2
    (C x K), or the one C x C FC of the single-FC form. A backward costs twice this."""
    return 2 * n * k * c * (1 if single_fc else 2)


@dataclass(frozen=True)
class Cost:
    """FLOPs and compulsory bytes of one call."""

    matmul_flops: int
    elementwise_flops: int
    compulsory_bytes: int

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.elementwise_flops


def sae_cost(n: int, c: int, hw: int, k: int, element_size: int, backward: bool = False,
             single_fc: bool = False) -> Cost:
    """The cost of one forward (``backward=False``) or forward + backward over an
    (N, C, H*W) input with stacked FC width K (K = C for the single-FC form)."""
    elements = n * c * hw
    weights = (c * c + c) if single_fc else (2 * k * c + k + c)
    matmul = fc_flops(n, c, k, single_fc)
    elementwise = 2 * elements + n * (k + c)
    traffic = 2 * elements + weights
    if backward:
        matmul *= 3
        elementwise += 4 * elements + n * (k + c)
        traffic += 3 * elements + 2 * weights
    return Cost(matmul, elementwise, traffic * element_size)
