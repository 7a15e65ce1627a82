"""What the C++ op's output pool (csrc/output_pool.h) buys: eager calls of the fused
blocks on outputs of 1 MiB or more, the same shape again and again as in a network's
steps. Run it twice, with the pool and without, and compare the medians:

    python benchmarks/output_pool.py
    SAE_KERNELS_CPU_OUTPUT_POOL_BYTES=0 python benchmarks/output_pool.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sae_kernels import FusedSaE, FusedSE

#: (N, C, side, branches): SE-ResNet-50 / SENetV2-ResNet-50 sites, an EfficientNet-B0 one
CASES = ((1, 256, 56, 1), (8, 144, 56, 1), (8, 256, 56, 1), (8, 512, 28, 4), (32, 256, 56, 1),
         (32, 1024, 14, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = os.environ.get("SAE_KERNELS_CPU_OUTPUT_POOL_BYTES", "default")
    print(f"float32, no grad, {args.threads} threads, median of {args.calls} calls, "
          f"SAE_KERNELS_CPU_OUTPUT_POOL_BYTES={pool}")
    with torch.no_grad():
        for n, channels, side, branches in CASES:
            block = FusedSE(channels) if branches == 1 else FusedSaE(channels,
                                                                     cardinality=branches)
            x = torch.randn(n, channels, side, side)
            for _ in range(3):
                block(x)
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                block(x)
                times.append(time.perf_counter() - start)
            print(f"{n} x {channels} x {side}², {branches} branch(es): "
                  f"{statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
