"""pytest-benchmark suite: the cases of ``sae-kernels bench`` (the SE sites of SE-ResNet-50
and SENetV2-ResNet-50, N = 1 and 32, NCHW, forward and forward+backward), one group per
case, the variants eager, compile, floor, fair_floor and fused in each (fair_floor is
skipped where it cannot run: on CUDA, or without the C++ CPU kernels).

    python -m pytest benchmarks --benchmark-enable             # measure
    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=group

The project's pytest options disable benchmarking, so the test run calls each variant
once as a smoke test, torch.compile on the first case of each mode only (its compilations
are most of the suite's time, and each case compiles the same graph at another shape).
``extra_info`` carries the achieved bandwidth (compulsory bytes / median) and, on the fused
variant, its speedups over eager and compile and its ratios to the floor and the fair
floor, measured before it in the same group.
"""

import pytest
import torch

from sae_kernels.sites import resnet50_sites
from sae_kernels.tools.bench import (
    MODES,
    Case,
    VariantUnavailable,
    case_operands,
    inductor_settings,
    variant_call,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
CASES = [Case(site, n, "nchw", mode) for mode in MODES for site in resnet50_sites()
         for n in (1, 32)]
#: The cases the smoke test compiles: the first of each mode.
SMOKE_COMPILED = {next(case for case in CASES if case.mode == mode) for mode in MODES}
#: The fused variant last, so that its ratios to the others can be computed.
VARIANTS = ("eager", "compile", "floor", "fair_floor", "fused")

#: (case, variant) -> median seconds, for the ratios.
_medians: dict[tuple[Case, str], float] = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.site.network.split('-')[0]}-"
                         f"{c.site.channels}x{c.site.size}-N{c.n}-{c.mode}")
def test_latency(benchmark, case, variant):
    if benchmark.disabled and variant == "compile" and case not in SMOKE_COMPILED:
        pytest.skip("smoke test: torch.compile runs on the first case of each mode")
    torch._dynamo.reset()
    with inductor_settings():
        torch.manual_seed(0)
        reference, x, grad = case_operands(case, DTYPE, DEVICE)
        try:
            call = variant_call(variant, reference, x, grad, fused_backend="auto")
        except VariantUnavailable as e:
            pytest.skip(str(e))
        call()  # compiles, loads the extension, warms the allocator: outside the timing
        benchmark.group = f"{case.label} {case.mode}"
        if DEVICE.type == "cuda":
            benchmark(_synchronized(call))
        else:
            benchmark(call)
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    _medians[case, variant] = median
    benchmark.extra_info["gbps"] = case.cost(DTYPE).compulsory_bytes / median / 1e9
    if variant == "fused":
        for other in ("eager", "compile"):
            if (case, other) in _medians:
                benchmark.extra_info[f"speedup_over_{other}"] = _medians[case, other] / median
        for floor in ("floor", "fair_floor"):
            if (case, floor) in _medians:
                benchmark.extra_info[f"{floor}_ratio"] = median / _medians[case, floor]


def _synchronized(call):
    def run():
        call()
        torch.cuda.synchronize()

    return run
