"""CPU benchmark: the fused SaE path against eager, torch.compile and the memory floor.

For every SE site of SE-ResNet-50 and SENetV2-ResNet-50 (``sae_kernels.sites``), fp32,
each batch size, layout and mode, the variants are timed interleaved in one process:

    eager    the reference ``SaE`` module in eager mode
    compile  ``torch.compile`` of the same module (inductor, dynamic=False)
    fused    ``FusedSaE.from_module(reference, backend=--backend)``
    floor    (inference only) ``x.clone()`` plus the two FC matmuls on an (N, C) input:
             what any out-of-place implementation must do, measured in the same run

Each round times every variant once (the mean of ``inner`` back-to-back calls, with
``inner`` chosen per shape and variant so one timing lasts >= 2 ms); the report gives the
median over rounds and quotes ratios, since the machines are shared and noisy. The
performance targets of the CPU path are checked at the end (PASS / MISS).

    python benchmarks/bench_cpu.py --quick --backend reference
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from sae_kernels import FusedSaE, SaE
from sae_kernels.sites import Site, resnet50_sites

VARIANTS = ("floor", "eager", "compile", "fused")
MODES = ("inference", "training")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
#: One timing (``inner`` back-to-back calls) lasts at least this long.
MIN_TIMING_SECONDS = 2e-3
WARMUP_CALLS = 10
QUICK_CHANNELS = (256, 2048)


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target: ``statistic`` of ``metric`` over one mode's shapes."""

    mode: str
    metric: str
    statistic: str
    op: str
    bound: float

    def describe(self) -> str:
        return f"{self.mode}: {self.statistic} {self.metric} {self.op} {self.bound:g}"


TARGETS = (
    Target("inference", "fused/floor", "max", "<=", 1.5),
    Target("inference", "fused/floor", "median", "<=", 1.25),
    Target("inference", "eager/fused", "median", ">=", 2.0),
    Target("inference", "compile/fused", "median", ">=", 1.3),
    Target("inference", "slower than eager", "count", "<=", 0),
    Target("inference", "slower than compile", "count", "<=", 0),
    Target("training", "eager/fused", "median", ">=", 2.0),
)


@dataclasses.dataclass(frozen=True)
class Stats:
    """Microseconds per call over the rounds."""

    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        micros = sorted(1e6 * s for s in seconds)

        def percentile(q: float) -> float:
            pos = q * (len(micros) - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            return micros[lo] + (micros[hi] - micros[lo]) * (pos - lo)

        return cls(statistics.median(micros), percentile(0.2), percentile(0.8))


@dataclasses.dataclass
class Row:
    """The measurements of one (mode, site, N, layout)."""

    mode: str
    site: Site
    n: int
    layout: str
    times: dict[str, Stats]
    inner: dict[str, int]
    errors: dict[str, str]

    def ratio(self, num: str, den: str) -> float | None:
        if num not in self.times or den not in self.times:
            return None
        return self.times[num].median / self.times[den].median

    def ratios(self) -> dict[str, float | None]:
        return {"fused/floor": self.ratio("fused", "floor"),
                "eager/fused": self.ratio("eager", "fused"),
                "compile/fused": self.ratio("compile", "fused")}

    def spread(self) -> float:
        """The largest (p80 - p20) / median over the variants: how noisy this row is."""
        return max((s.p80 - s.p20) / s.median for s in self.times.values())

    def to_json(self) -> dict:
        return {"mode": self.mode, "site": dataclasses.asdict(self.site), "name": self.site.name,
                "n": self.n, "layout": self.layout,
                "times_us": {k: dataclasses.asdict(v) for k, v in self.times.items()},
                "inner": self.inner, "ratios": self.ratios(), "errors": self.errors}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_input(site: Site, n: int, layout: str, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(n, site.channels, site.size, site.size)
    return x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(requires_grad)


def make_variants(site: Site, x: torch.Tensor, mode: str, backend: str
                  ) -> dict[str, Callable[[], object]]:
    """One zero-argument call per variant, running the measured work once."""
    ref = SaE(site.channels, site.reduction, site.cardinality)
    modules = {
        "eager": ref,
        "compile": torch.compile(ref, dynamic=False),
        "fused": FusedSaE.from_module(ref, backend=backend),
    }
    if mode == "inference":
        calls: dict[str, Callable[[], object]] = {"floor": floor_call(ref, x)}
        for name, module in modules.items():
            calls[name] = inference_call(module, x)
        return calls
    grad = torch.randn_like(x)  # in x's memory format, like the output
    return {name: training_call(module, x, grad) for name, module in modules.items()}


def floor_call(ref: SaE, x: torch.Tensor) -> Callable[[], object]:
    """``x.clone()`` (allocate, read and write x once) plus both FCs on an (N, C) input."""
    w1, b1 = (t.detach() for t in ref.stacked_fc1())
    w2, b2 = ref.excite.weight.detach(), ref.excite.bias.detach()
    z = torch.randn(x.shape[0], x.shape[1])

    def call() -> torch.Tensor:
        x.clone()
        h = torch.addmm(b1, z, w1.t())
        return torch.addmm(b2, h, w2.t())

    return call


def inference_call(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Forward under ``torch.no_grad()``."""
    def call() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


def training_call(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor
                  ) -> Callable[[], object]:
    """Forward and backward with a preallocated output gradient; gradients reset to None."""
    leaves = [x, *module.parameters()]

    def call() -> None:
        for t in leaves:
            t.grad = None
        module(x).backward(grad)

    return call


def calibrate(call: Callable[[], object]) -> int:
    """The number of back-to-back calls that lasts about MIN_TIMING_SECONDS, from the
    fastest of three timings so that a noisy one does not shrink it."""
    n = 1
    while (elapsed := timed(call, n)) < MIN_TIMING_SECONDS:
        n *= 2
    elapsed = min(elapsed, timed(call, n), timed(call, n))
    return max(1, math.ceil(n * MIN_TIMING_SECONDS / elapsed))


def timed(call: Callable[[], object], inner: int) -> float:
    """Seconds taken by ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return time.perf_counter() - start


def measure(site: Site, n: int, layout: str, mode: str, backend: str, rounds: int) -> Row:
    """Warm up and calibrate every variant, then time them interleaved over ``rounds``."""
    torch._dynamo.reset()  # a fresh compile per shape, clear of the recompile limit
    x = make_input(site, n, layout, requires_grad=mode == "training")
    calls = make_variants(site, x, mode, backend)
    errors: dict[str, str] = {}
    for name in list(calls):
        try:
            for _ in range(WARMUP_CALLS):
                calls[name]()
        except Exception as e:  # a failed compile is a finding to report, not a crash
            if name != "compile":
                raise
            errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            del calls[name]
    inner = {name: calibrate(call) for name, call in calls.items()}
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timed(calls[name], inner[name]) / inner[name])
    times = {name: Stats.of(samples[name]) for name in VARIANTS if name in samples}
    return Row(mode, site, n, layout, times, inner, errors)


def summarize(rows: list[Row]) -> dict[str, dict[str, float | int | None]]:
    """Per mode: statistics of the ratios over its shapes."""
    summary = {}
    for mode in MODES:
        mode_rows = [r for r in rows if r.mode == mode]
        if not mode_rows:
            continue
        values = {key: [v for r in mode_rows if (v := r.ratios()[key]) is not None]
                  for key in ("fused/floor", "eager/fused", "compile/fused")}
        stats: dict[str, float | int | None] = {"shapes": len(mode_rows)}
        if values["fused/floor"]:  # the floor is measured in inference only
            stats["median fused/floor"] = statistics.median(values["fused/floor"])
            stats["max fused/floor"] = max(values["fused/floor"])
        summary[mode] = stats | {
            "min eager/fused": min(values["eager/fused"], default=None),
            "median eager/fused": median_or_none(values["eager/fused"]),
            "min compile/fused": min(values["compile/fused"], default=None),
            "median compile/fused": median_or_none(values["compile/fused"]),
            "count slower than eager": sum(v < 1 for v in values["eager/fused"]),
            "count slower than compile": sum(v < 1 for v in values["compile/fused"]),
            "compile failures": sum("compile" in r.errors for r in mode_rows),
        }
    return summary


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def check(target: Target, summary: dict) -> str:
    """PASS, MISS, or N/A where the mode or the metric was not measured."""
    value = summary.get(target.mode, {}).get(f"{target.statistic} {target.metric}")
    if value is None or (target.statistic == "count" and not has_compile(target, summary)):
        return "N/A"
    ok = value <= target.bound if target.op == "<=" else value >= target.bound
    return "PASS" if ok else "MISS"


def has_compile(target: Target, summary: dict) -> bool:
    """A 'slower than compile' count means nothing when no compile was measured."""
    mode = summary[target.mode]
    return "compile" not in target.metric or mode["compile failures"] < mode["shapes"]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (f"{'site':<31} {'N':>3} {'layout':<13} {'floor':>8} {'eager':>8} {'compile':>8} "
          f"{'fused':>8}  {'fused/':>6} {'eager/':>6} {'comp/':>6} {'spread':>6}")
SUBHEADER = (f"{'':<31} {'':>3} {'':<13} {'(median us per call)':>35}  "
             f"{'floor':>6} {'fused':>6} {'fused':>6} {'p80-20':>6}")


def format_row(row: Row) -> str:
    us = {name: fmt(row.times[name].median if name in row.times else None, ".1f")
          for name in VARIANTS}
    ratios = row.ratios()
    line = (f"{row.site.name:<31} {row.n:>3} {row.layout:<13} {us['floor']:>8} {us['eager']:>8} "
            f"{us['compile']:>8} {us['fused']:>8}  {fmt(ratios['fused/floor'], '.2f'):>6} "
            f"{fmt(ratios['eager/fused'], '.2f'):>6} {fmt(ratios['compile/fused'], '.2f'):>6} "
            f"{row.spread():>6.0%}")
    return line + "".join(f"\n    {name} failed: {err}" for name, err in row.errors.items())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu",
                   help="FusedSaE backend of the fused variant (default: cpu)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 32 (--quick: 1)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS),
                   help="default: nchw channels_last (--quick: nchw)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--channels", type=int, nargs="+",
                   help="only the sites with these channel counts (default: all; --quick: "
                        f"{' '.join(map(str, QUICK_CHANNELS))})")
    p.add_argument("--rounds", type=int, help="interleaved rounds per shape (default: 15; "
                                              "--quick: 5)")
    p.add_argument("--quick", action="store_true",
                   help="5 rounds, C in {256, 2048}, N=1, NCHW; explicit options override")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="write the rows and the summary as JSON")
    args = p.parse_args()
    if args.batch_sizes is None:
        args.batch_sizes = [1] if args.quick else [1, 32]
    if args.layouts is None:
        args.layouts = ["nchw"] if args.quick else list(LAYOUTS)
    if args.channels is None and args.quick:
        args.channels = list(QUICK_CHANNELS)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    return args


def main() -> int:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # inductor compiles in a pool of worker processes by default; their start-up would
    # share these cores with the first shapes' timings
    torch._inductor.config.compile_threads = 1
    torch.manual_seed(0)
    sites = [s for s in resnet50_sites() if args.channels is None or s.channels in args.channels]
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu": cpu_model(), "backend": args.backend, "rounds": args.rounds}
    print(f"torch {environment['torch']}, {environment['threads']} threads, {environment['cpu']}")
    print(f"fp32, fused backend {args.backend!r}, {args.rounds} interleaved rounds, "
          f"median over rounds")

    rows = []
    # one discarded shape first: the extension load, the first compile and its background
    # work would otherwise land in the first measured shape's timings
    measure(sites[0], 1, args.layouts[0], "inference", args.backend, rounds=1)
    for mode in args.modes:
        print(f"\n{mode}\n{HEADER}\n{SUBHEADER}", flush=True)
        for site in sites:
            for n in args.batch_sizes:
                for layout in args.layouts:
                    rows.append(measure(site, n, layout, mode, args.backend, args.rounds))
                    print(format_row(rows[-1]), flush=True)
                    gc.collect()

    summary = summarize(rows)
    print("\nsummary (ratios of medians; eager/fused and compile/fused are speedups)")
    for mode, stats in summary.items():
        print(f"  {mode} ({stats['shapes']} shapes)")
        for key, value in stats.items():
            if key != "shapes":
                print(f"    {key:<26} {value if isinstance(value, int) else fmt(value, '.2f')}")

    checks = [(t.describe(), check(t, summary)) for t in TARGETS]
    print("\ntargets")
    for description, verdict in checks:
        print(f"  {verdict:<4}  {description}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "rows": [r.to_json() for r in rows],
                       "summary": summary, "targets": dict(checks)}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
