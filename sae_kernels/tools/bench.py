"""``sae-kernels bench``: the fused layer against eager PyTorch, torch.compile and the
memory floors, one SE site at a time.

Variants, built from one reference block and timed interleaved in one process
(``timing``):

    eager       the reference ``SaE`` block
    compile     ``torch.compile`` of it (inductor, ``dynamic=False``)
    fused       ``FusedSaE.from_module(reference)``
    floor       the compulsory work of ``sae_kernels.cost``, measured: ``x.clone()`` plus
                the two FC matmuls on an (N, C) input; with the backward also ``g + x``
                (reads g and x, writes one tensor) and the four matmuls of the FC gradients
    fair_floor  the floor with the fused output's allocation (CPU, C++ kernels loaded):
                ``cpu_copy_like_output(x)`` in place of ``x.clone()``; with the backward
                ``g + x`` in a tensor allocated the same way (g copied into it, then x
                added: one read and one write more than the floor). The C++ operator
                advises outputs of 32 MiB and more onto huge pages, whose first write is
                much cheaper than a clone's page faults: on large tensors the plain floor is
                unfair to it

A variant that cannot run (a failed compile, the fair floor on CUDA or without the C++
kernels) is left out of the timings and reported in ``Result.errors``.

Per case: latency (median, p20, p80), the fused layer's speedup over eager and over
torch.compile, its ratios to the floors, achieved bandwidth (compulsory bytes / median),
FLOPs (analytic, the matmul part checked against ``FlopCounterMode`` on the eager and
fused variants) and launches per call (``launches``).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from collections.abc import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..cost import Cost, sae_cost
from ..dispatch import resolve_backend
from ..kernels import cpu as cpu_kernels
from ..layers import FusedSaE
from ..reference import SaE
from ..sites import Site
from .launches import count_launches
from .timing import Stats, measure_interleaved

VARIANTS = ("eager", "compile", "fused", "floor", "fair_floor")
MODES = ("forward", "forward+backward")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class VariantUnavailable(Exception):
    """A variant that cannot run on this device or in this build: skipped, not a crash."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration."""

    site: Site
    n: int
    layout: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.site.name} N={self.n} {self.layout}"

    def cost(self, dtype: torch.dtype) -> Cost:
        site = self.site
        return sae_cost(self.n, site.channels, site.size**2, site.stacked_width,
                        dtype.itemsize, backward=self.mode == "forward+backward")


def cases(sites: list[Site], batch_sizes: list[int], layouts: list[str], modes: list[str]
          ) -> list[Case]:
    return [Case(site, n, layout, mode) for mode in modes for site in sites
            for n in batch_sizes for layout in layouts]


def custom_site(shape: str, reduction: int, cardinality: int) -> Site:
    """A site from ``CxHxW`` (H = W) or ``CxS``."""
    try:
        dims = [int(d) for d in shape.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) not in (2, 3) or len(dims) == 3 and dims[1] != dims[2] or min(dims) < 1:
        raise ValueError(f"shape {shape!r}: expected CxHxW with H = W (e.g. 256x56x56) or CxS")
    if dims[0] // reduction < 1:
        raise ValueError(f"shape {shape!r}: C / reduction must be at least 1")
    return Site("custom", dims[0], dims[1], reduction, cardinality)


@dataclasses.dataclass
class Result:
    """The measurements of one case."""

    case: Case
    dtype: torch.dtype
    #: The backend the fused variant ran on (``cpu``, ``triton`` or ``reference``).
    fused_backend: str
    times: dict[str, Stats]
    launches: dict[str, int]
    cost: Cost
    #: Matmul FLOPs that FlopCounterMode counted, per variant checked.
    counted_flops: dict[str, int]
    #: Why a variant asked for is not in ``times`` (a failed compile, an unavailable one).
    errors: dict[str, str]

    def ratio(self, num: str, den: str) -> float | None:
        if num not in self.times or den not in self.times:
            return None
        return self.times[num].median / self.times[den].median

    def speedup(self, over: str) -> float | None:
        """How many times faster the fused variant is than ``over``."""
        return self.ratio(over, "fused")

    @property
    def floor_ratio(self) -> float | None:
        """Fused latency over the floor's: 1 is the least any implementation can take."""
        return self.ratio("fused", "floor")

    @property
    def fair_floor_ratio(self) -> float | None:
        """Fused latency over the fair floor's, which allocates its outputs as the fused
        operator does: the ratio without the plain floor's page-fault handicap."""
        return self.ratio("fused", "fair_floor")

    def gbps(self, variant: str) -> float | None:
        """Achieved bandwidth: the compulsory bytes over the median latency."""
        if variant not in self.times:
            return None
        return self.cost.compulsory_bytes / (self.times[variant].median * 1e3)

    @property
    def flops_match(self) -> bool:
        return all(v == self.cost.matmul_flops for v in self.counted_flops.values())

    def to_json(self) -> dict:
        case = self.case
        return {
            "site": case.site.name, "channels": case.site.channels, "size": case.site.size,
            "reduction": case.site.reduction, "cardinality": case.site.cardinality,
            "n": case.n, "layout": case.layout, "mode": case.mode,
            "dtype": str(self.dtype).removeprefix("torch."), "fused_backend": self.fused_backend,
            "latency_us": {k: dataclasses.asdict(v) for k, v in self.times.items()},
            "speedup_over_eager": self.speedup("eager"),
            "speedup_over_compile": self.speedup("compile"),
            "floor_ratio": self.floor_ratio,
            "fair_floor_ratio": self.fair_floor_ratio,
            "gbps": {k: self.gbps(k) for k in self.times},
            "flops": {"matmul": self.cost.matmul_flops,
                      "elementwise": self.cost.elementwise_flops,
                      "total": self.cost.flops, "counted_matmul": self.counted_flops},
            "bytes": self.cost.compulsory_bytes,
            "launches": self.launches,
            "errors": self.errors,
        }


def run_case(case: Case, dtype: torch.dtype, device: torch.device, variants: list[str],
             fused_backend: str, rounds: int) -> Result:
    """Build the variants of ``case``, time them interleaved, count launches and FLOPs."""
    torch._dynamo.reset()  # a fresh compile per case, clear of the recompile limit
    with inductor_settings():
        reference, x, grad = case_operands(case, dtype, device)
        calls, errors = {}, {}
        for name in variants:
            try:
                calls[name] = variant_call(name, reference, x, grad, fused_backend)
                calls[name]()
            except Exception as e:  # a finding to report, not a crash
                if name != "compile" and not isinstance(e, VariantUnavailable):
                    raise
                errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                calls.pop(name, None)
        times = measure_interleaved(calls, rounds, device)
        launches = {name: count_launches(call, device) for name, call in calls.items()}
        counted = {name: _matmul_flops(calls[name]) for name in ("eager", "fused")
                   if name in calls}
    resolved = resolve_backend(fused_backend, device, dtype)
    return Result(case, dtype, resolved, {v: times[v] for v in VARIANTS if v in times},
                  launches, case.cost(dtype), counted, errors)


def inductor_settings():
    """One compile thread: a pool of workers starting up would share the cores with the
    timings. Kernel profiling makes inductor's generated kernels visible to the launch
    count (a thread-local check per kernel when no profiler runs)."""
    return torch._inductor.config.patch(compile_threads=1, **{"cpp.enable_kernel_profile": True})


def case_operands(case: Case, dtype: torch.dtype, device: torch.device
                  ) -> tuple[SaE, torch.Tensor, torch.Tensor | None]:
    """The reference block, the input in the case's layout (requiring grad in
    forward+backward) and the output gradient (None in forward)."""
    site = case.site
    reference = SaE(site.channels, site.reduction, site.cardinality).to(device, dtype)
    backward = case.mode == "forward+backward"
    x = torch.randn(case.n, site.channels, site.size, site.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[case.layout]).requires_grad_(backward)
    grad = torch.randn_like(x) if backward else None  # in x's memory format
    return reference, x, grad


def run_cases(todo: list[Case], dtype: torch.dtype, device: torch.device, variants: list[str],
              fused_backend: str, rounds: int) -> Iterator[Result]:
    """``run_case`` over ``todo``, after one discarded case that takes the extension load,
    the first compile and their background work out of the first measured case."""
    if todo:
        run_case(todo[0], dtype, device, variants, fused_backend, rounds=1)
    for case in todo:
        yield run_case(case, dtype, device, variants, fused_backend, rounds)
        gc.collect()


def variant_call(name: str, reference: SaE, x: torch.Tensor, grad: torch.Tensor | None,
                 fused_backend: str) -> Callable[[], object]:
    """A zero-argument call that runs variant ``name`` once (forward under no_grad, or
    forward and backward with the gradients reset to None)."""
    if name == "floor":
        return _floor_call(reference, x, grad)
    if name == "fair_floor":
        return _fair_floor_call(reference, x, grad)
    module = {"eager": lambda: reference,
              "compile": lambda: torch.compile(reference, dynamic=False),
              "fused": lambda: FusedSaE.from_module(reference, backend=fused_backend)}[name]()
    if grad is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return forward
    leaves = [x, *module.parameters()]

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        module(x).backward(grad)

    return forward_backward


def _floor_call(reference: SaE, x: torch.Tensor, grad: torch.Tensor | None
                ) -> Callable[[], object]:
    """The compulsory traffic and the FC matmuls, with no dependency between them."""
    return _floor_like_call(reference, x, grad, torch.clone, torch.add)


def _fair_floor_call(reference: SaE, x: torch.Tensor, grad: torch.Tensor | None
                     ) -> Callable[[], object]:
    """The floor with its outputs allocated as the C++ operator allocates its own."""
    if x.device.type != "cpu":
        raise VariantUnavailable(f"the fused output's allocation is the C++ CPU operator's; "
                                 f"none on {x.device.type}")
    if not cpu_kernels.available():
        raise VariantUnavailable("needs the C++ CPU kernels, which are not loaded")
    copy_like_output = torch.ops.sae_kernels.cpu_copy_like_output

    def add_like_output(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The operator only copies, so g + x costs one more read and write of a tensor the
        # size of x than the floor's torch.add (g copied, then read back and added to);
        # the copy is the output's first write, which pays for its allocation.
        return copy_like_output(g).add_(x)

    return _floor_like_call(reference, x, grad, copy_like_output, add_like_output)


def _floor_like_call(reference: SaE, x: torch.Tensor, grad: torch.Tensor | None,
                     copy: Callable[[torch.Tensor], torch.Tensor],
                     add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                     ) -> Callable[[], object]:
    """The FC matmuls of the floor, with ``copy(x)`` and, with the backward, ``add(g, x)``
    making the (N, C, H, W) outputs."""
    w1, b1 = (t.detach() for t in reference.stacked_fc1())
    w2, b2 = reference.excite.weight.detach(), reference.excite.bias.detach()
    z = torch.randn(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    x = x.detach()

    def forward() -> torch.Tensor:
        copy(x)
        h = torch.addmm(b1, z, w1.t())
        return torch.addmm(b2, h, w2.t())

    if grad is None:
        return forward

    def forward_backward() -> None:
        h = forward()  # (N, C): stands in for both the hidden vector and dp
        add(grad, x)
        dh = h @ w2
        torch.mm(h.t(), dh)  # dW2's shape (C, K)
        torch.mm(dh.t(), z)  # dW1
        dh @ w1  # dz

    return forward_backward


def _matmul_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def summarize(results: list[Result]) -> dict[str, dict[str, float | int | None]]:
    """Per mode: the median and the worst of each ratio over its cases."""
    summary = {}
    for mode in MODES:
        rows = [r for r in results if r.case.mode == mode]
        if not rows:
            continue
        over_eager = _present(r.speedup("eager") for r in rows)
        over_compile = _present(r.speedup("compile") for r in rows)
        floor = _present(r.floor_ratio for r in rows)
        fair_floor = _present(r.fair_floor_ratio for r in rows)
        summary[mode] = {
            "cases": len(rows),
            "median speedup over eager": _median(over_eager),
            "min speedup over eager": min(over_eager, default=None),
            "median speedup over compile": _median(over_compile),
            "min speedup over compile": min(over_compile, default=None),
            "median fused/floor": _median(floor),
            "max fused/floor": max(floor, default=None),
            "median fused/fair_floor": _median(fair_floor),
            "max fused/fair_floor": max(fair_floor, default=None),
            "cases slower than eager": sum(v < 1 for v in over_eager),
            "cases slower than compile": sum(v < 1 for v in over_compile),
            "compile failures": sum("compile" in r.errors for r in rows),
            "FLOP count mismatches": sum(not r.flops_match for r in rows),
        }
    return summary


def _present(values) -> list[float]:
    return [v for v in values if v is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
