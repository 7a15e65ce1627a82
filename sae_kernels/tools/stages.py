"""``sae-kernels stages``: where the fused CPU operator's time goes, stage by stage.

For each SE site (this package's SE-ResNet-50 and SENetV2-ResNet-50 sites, or those of a
timm / torchvision model, read from a forward pass with their prologue), one fused block
in inference:

    total      the block's median latency (``timing.measure_interleaved``), beside
    clone      a ``clone`` of its input: the least a call producing a new tensor costs,
    addmm      ATen's ``addmm`` for the same FCs on (N, C) and (N, K) inputs (what the
               excitation stage is measured against);
    fixed      total minus the three stages: the call into the op, its checks and its
               allocations (what a small batch pays on top of the work; a profiled
               call's own time would add the profiler's records of its other
               operators, tens of microseconds);
    pool, excitation, rescale
               the op's stages as ``torch.profiler`` times its ranges
               (``sae_kernels::pool`` ...: the two passes over x and the FCs with act
               and gate between them; for one NCHW sample FC2's ranges lie within the
               rescale's, and each stage counts its own time), per call, the median over
               the profiled calls (one call slowed by the machine moves a mean by its
               whole delay over twenty).
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..convert import convert
from ..layers import FusedSaE
from ..sites import resnet50_sites
from .launches import profiled
from .timing import measure_interleaved

STAGES = ("pool", "excitation", "rescale")
#: Profiled calls per site (after the timed ones).
PROFILED_CALLS = 20
#: The profiler range around each profiled call, which its stages' ranges fall within.
CALL_RANGE = "sae_kernels.stages::call"


@dataclasses.dataclass(frozen=True)
class StageRow:
    """One site's breakdown, microseconds per call."""

    site: str
    shape: tuple[int, int, int, int]
    stacked_width: int
    prologue: str
    total: float
    clone: float
    addmm: float
    stages: dict[str, float]

    @property
    def fixed(self) -> float:
        return self.total - sum(self.stages.values())


def resnet50_blocks() -> list[tuple[str, FusedSaE, tuple[int, int, int]]]:
    """The SE-ResNet-50 and SENetV2-ResNet-50 sites as fused blocks (SE-ResNet tail:
    no prologue)."""
    blocks = []
    for site in resnet50_sites():
        block = FusedSaE(site.channels, site.reduction, site.cardinality).eval()
        blocks.append((site.name, block, (site.channels, site.size, site.size)))
    return blocks


def model_blocks(model: nn.Module, input_shape: tuple[int, int, int],
                 ) -> list[tuple[str, nn.Module, tuple[int, int, int]]]:
    """The fused SE blocks of ``convert(model)`` (eval) with the input shape each sees."""
    converted, report = convert(model.eval())
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(path: str) -> Callable:
        def hook(module, args, out) -> None:
            shapes[path] = tuple(args[0].shape[1:])
        return hook

    handles = [converted.get_submodule(c.path).register_forward_hook(record(c.path))
               for c in report.converted]
    with torch.inference_mode():
        converted(torch.randn(1, *input_shape))
    for handle in handles:
        handle.remove()
    return [(c.path, converted.get_submodule(c.path), shapes[c.path]) for c in report.converted
            if c.path in shapes]


def breakdown(blocks: list[tuple[str, nn.Module, tuple[int, int, int]]], n: int = 1,
              rounds: int = 15, progress: Callable[[str], None] | None = None,
              ) -> list[StageRow]:
    """Time and profile each block at batch size ``n`` on the CPU (inference)."""
    rows = []
    cpu = torch.device("cpu")
    for name, block, shape in blocks:
        if progress:
            progress(name)
        x = torch.randn(n, *shape)
        with torch.inference_mode():
            timed = measure_interleaved({"block": partial(block, x), "clone": x.clone,
                                         "addmm": _aten_fcs(block, n)}, rounds, cpu)
            with profiled(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(PROFILED_CALLS):
                    with torch.profiler.record_function(CALL_RANGE):
                        block(x)
        norm = getattr(block, "prologue_norm", None)
        prologue = "none" if norm is None else f"affine + {norm.act}"
        rows.append(StageRow(name, (n, *shape), _stacked_width(block), prologue,
                             timed["block"].median, timed["clone"].median,
                             timed["addmm"].median, _stage_medians(prof.events())))
    return rows


def _stage_medians(events) -> dict[str, float]:
    """Each stage's time per profiled call (its ranges' self time: a lone NCHW sample's
    FC2 runs inside the rescale's range), the median over the calls."""
    starts = sorted(e.time_range.start for e in events if e.name == CALL_RANGE)
    spent = {stage: [0.0] * len(starts) for stage in STAGES}
    for event in events:
        stage = event.name.removeprefix("sae_kernels::")
        if stage in spent:
            call = bisect.bisect_right(starts, event.time_range.start) - 1
            spent[stage][call] += event.self_cpu_time_total
    return {stage: statistics.median(times) for stage, times in spent.items()}


def _aten_fcs(block: nn.Module, n: int) -> Callable[[], object]:
    """The block's FCs as ATen addmm calls on random (N, C) and (N, K) inputs."""
    if isinstance(block, FusedSaE):
        w1, b1 = (t.detach() if t is not None else None for t in block.stacked_fc1())
        fcs = [(w1, b1), (block.excite.weight.detach(), block.excite.bias)]
    else:  # the single-FC form
        fcs = [(block.fc.weight.detach(), block.fc.bias)]
    inputs = [torch.randn(n, w.shape[1]) for w, _ in fcs]
    zero = [torch.zeros(w.shape[0]) for w, _ in fcs]

    def call() -> None:
        for (w, b), v, z in zip(fcs, inputs, zero, strict=True):
            torch.addmm(z if b is None else b.detach(), v, w.t())

    return call


def _stacked_width(block: nn.Module) -> int:
    if isinstance(block, FusedSaE):
        return block.cardinality * block.rd_channels
    return block.channels  # the single-FC form


def format_rows(rows: list[StageRow]) -> str:
    """A markdown table, microseconds per call."""
    head = ["site", "N x C x H x W", "K", "prologue", "total", "clone", "fixed", *STAGES,
            "addmm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.site, "x".join(map(str, r.shape)), str(r.stacked_width), r.prologue,
                 f"{r.total:.1f}", f"{r.clone:.1f}", f"{r.fixed:.1f}",
                 *(f"{r.stages[s]:.1f}" for s in STAGES), f"{r.addmm:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    fcs = [r.stages["excitation"] / r.addmm for r in rows]
    lines.append(f"\nmedian over sites: fixed {statistics.median(r.fixed for r in rows):.1f} us, "
                 f"total / clone {statistics.median(r.total / r.clone for r in rows):.2f}, "
                 f"excitation / addmm {statistics.median(fcs):.2f} (max {max(fcs):.2f})")
    return "\n".join(lines)
