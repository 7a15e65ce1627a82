"""Every SE site timed in place inside a compiled whole network, the original against the
converted model, from torch.profiler: what a site costs with the cache as the rest of the
network leaves it, which units compiled alone (``compiled_se_blocks.py``) cannot show.

Both networks are compiled with torch.compile (default settings; inductor's per-kernel
profiling on) and run in inference at batch size N, interleaved, one profiled call of
each a round. In the graphs inductor generates, every SE site is three steps, found in
the order the graph runs them:

- **pool**: the reduction kernel that produces the means (with the BatchNorm and
  activation inductor folds into it, in the original and in the converted prologue alike);
- **excitation**: the ops between that kernel and the rescale, the FCs on the (N, C) means:
  the 1x1 convolutions or ``addmm`` and their activation kernels in the original,
  ``sae_kernels::cpu_excite`` in the converted model (``dispatch.cpu_excitation_for``);
- **rescale**: the kernel that applies the gate (the sigmoid folded in in the original,
  the shortcut and the activation after it where the block has them).

A site's time is the sum of the three, each the median over the rounds. The profiler
times each op from its entry to its exit, the ops it calls included, and not the caller's
code around it (timed alone, warm: a 1x1 convolution on 480 means, 13 ops recorded, reads
6.0 µs against 8.0 µs a call unprofiled; ``cpu_excite`` 3.8 against 5.7); the table gives
how many ops each excitation recorded.

    python benchmarks/compiled_se_sites.py efficientnet_b0 seresnet50 -n 1 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity

from sae_kernels import convert
from sae_kernels.tools.bench import inductor_settings
from sae_kernels.tools.launches import profiled
from sae_kernels.tools.model_bench import build
from sae_kernels.tools.timing import round_order, warm_up

# ops that run an SE's FCs in a compiled graph, on (N, C) means or (N, C, 1, 1) maps
FC_OPS = {"aten::convolution", "aten::addmm", "aten::mm", "aten::bmm", "aten::linear",
          "sae_kernels::cpu_excite"}
STEPS = ("pool", "excitation", "rescale")


@dataclass(frozen=True)
class SiteSpan:
    """One SE site in a compiled graph's ops, by position: its pool kernel, the ops of its
    excitation and its rescale kernel."""

    pool: int
    excitation: tuple[int, ...]
    rescale: int


def graph_ops(events: list[FunctionEvent]) -> list[FunctionEvent]:
    """The ops compiled graphs call (their kernels and ATen or custom ops), in order."""
    ops = [e for e in events if e.cpu_parent is not None
           and e.cpu_parent.name.startswith("## Call CompiledFxGraph")]
    return sorted(ops, key=lambda e: e.time_range.start)


def _is_kernel(op: FunctionEvent) -> bool:
    return "cpp_fused" in op.name


def _is_fc(op: FunctionEvent) -> bool:
    """An FC op on means: its first operand of two dimensions or more is (N, C) or
    (N, C, 1, 1); read from the shapes the profiler recorded."""
    if op.name not in FC_OPS:
        return False
    shapes = [s for s in op.input_shapes if isinstance(s, list) and len(s) >= 2]
    return bool(shapes) and (len(shapes[0]) == 2 or shapes[0][2:] == [1, 1])


def find_sites(ops: list[FunctionEvent]) -> list[SiteSpan]:
    """The SE sites among ``ops`` (recorded with shapes). A site starts at a kernel with
    ``mean`` in its name; FC ops on means follow; its rescale is the first kernel after them
    that multiplies (``mul`` in its name). Between the FCs and the rescale, other kernels
    belong to the excitation (the activation; a gate inductor computes apart) and ops on
    maps to the block's other work (a shortcut's convolution, which inductor runs before
    the kernel that rescales and adds the shortcut). A reduction no FC op follows (a
    network's head) is not a site."""
    sites, pool, excitation, fc_seen = [], None, [], False
    for i, op in enumerate(ops):
        kernel = _is_kernel(op)
        if pool is not None and fc_seen and kernel and "mul" in op.name:
            sites.append(SiteSpan(pool, tuple(excitation), i))
            pool = None
        if kernel and "mean" in op.name:  # the rescale just found may hold the next pool
            pool, excitation, fc_seen = i, [], False
        elif pool is None:
            continue
        elif op.name in FC_OPS and not _is_fc(op):
            if not fc_seen:
                pool = None  # an op on a map before any FC: not an SE pool
        else:
            excitation.append(i)
            fc_seen = fc_seen or _is_fc(op)
    return sites


def _inclusive_ops(op: FunctionEvent) -> int:
    return 1 + sum(_inclusive_ops(child) for child in op.cpu_children)


def site_steps(ops: list[FunctionEvent], site: SiteSpan) -> dict[str, float]:
    """Each step's time (µs), and how many ops the profiler recorded in the excitation."""
    between = [ops[i] for i in site.excitation]
    return {"pool": ops[site.pool].cpu_time_total,
            "excitation": sum(op.cpu_time_total for op in between),
            "rescale": ops[site.rescale].cpu_time_total,
            "ops": sum(_inclusive_ops(op) for op in between)}


def site_time(steps: dict[str, float]) -> float:
    return sum(steps[step] for step in STEPS)


def profiled_ops(call: Callable[[], object], record_shapes: bool) -> list[FunctionEvent]:
    """The ops the compiled graphs of one ``call()`` ran."""
    with profiled(activities=[ProfilerActivity.CPU], record_shapes=record_shapes) as profile:
        call()
    return graph_ops(list(profile.events()))


def time_sites(models: dict[str, nn.Module], x: torch.Tensor, expected: int, rounds: int
               ) -> dict[str, list[dict[str, float]]]:
    """Per model, each site's steps, medians over ``rounds`` interleaved profiled calls."""
    calls = {}
    for name, module in models.items():
        compiled = torch.compile(module)
        calls[name] = lambda compiled=compiled: compiled(x)
    with torch.inference_mode():
        warm_up(calls)
        spans, names = {}, {}
        for name, call in calls.items():
            ops = profiled_ops(call, record_shapes=True)
            spans[name], names[name] = find_sites(ops), [op.name for op in ops]
            if len(spans[name]) != expected:
                raise SystemExit(f"compiled_se_sites: found {len(spans[name])} SE sites in the "
                                 f"{name} model's compiled graph, expected {expected}")
        samples = {name: [[] for _ in spans[name]] for name in calls}
        for r in range(rounds):
            for name in round_order(list(calls), r):
                ops = profiled_ops(calls[name], record_shapes=False)
                if [op.name for op in ops] != names[name]:
                    raise SystemExit(f"compiled_se_sites: the {name} graph ran other ops")
                for site, span in zip(samples[name], spans[name], strict=True):
                    site.append(site_steps(ops, span))
    return {name: [{key: statistics.median(s[key] for s in site) for key in (*STEPS, "ops")}
                   for site in sites] for name, sites in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("model | N | site | C | K | pool µs | excitation µs (ops) | rescale µs | site µs | "
          "original / converted")
    for name in args.models:
        model = build(name)
        original = model.module.eval()
        converted, report = convert(copy.deepcopy(original))
        for n in args.batch_sizes:
            torch._dynamo.reset()
            x = torch.randn(n, *model.input_shape)
            with inductor_settings():
                sites = time_sites({"original": original, "converted": converted}, x,
                                   len(report.converted), args.rounds)
            ratios = []
            for block, before, after in zip(report.converted, sites["original"],
                                            sites["converted"], strict=True):
                ratios.append(site_time(before) / site_time(after))
                print(f"{name} | {n} | {block.path} | {block.channels} | {block.rd_channels} | "
                      f"{before['pool']:.1f} / {after['pool']:.1f} | "
                      f"{before['excitation']:.1f} ({before['ops']:.0f}) / "
                      f"{after['excitation']:.1f} ({after['ops']:.0f}) | "
                      f"{before['rescale']:.1f} / {after['rescale']:.1f} | "
                      f"{site_time(before):.1f} / {site_time(after):.1f} | {ratios[-1]:.2f}",
                      flush=True)
            print(f"{name} | {n} | all {len(ratios)} sites | median {statistics.median(ratios):.2f}"
                  f", lowest {min(ratios):.2f}, below 0.97: {sum(r < 0.97 for r in ratios)}",
                  flush=True)

if __name__ == "__main__":
    main()
