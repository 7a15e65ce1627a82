"""``sae-kernels plan``: per SE site, the plan the dispatcher picks on a GPU and the
model's times for it, for the HBM floor and for what torch.compile generates (``gpu_plan``).

The block at each site is the one ``convert`` makes of an SE-ResNet bottleneck: the SE
with ``bn3`` as its prologue and the shortcut add and ReLU as its epilogue, in bf16; the
torch.compile side is modelled for the same block.
"""

from __future__ import annotations

import torch

from ..gpu_plan import (
    GPUS,
    GpuSpec,
    LaunchPlan,
    Problem,
    backward_launches,
    compile_seconds,
    device_spec,
    floor_seconds,
    forward_launches,
    model_seconds,
    plan_launch,
    training_forward,
)
from ..sites import resnet50_sites

BATCH_SIZES = (1, 8, 32, 128)


def site_problem(channels: int, hw: int, k: int, n: int, channels_last: bool,
                 element_size: int = 2) -> Problem:
    """The converted bottleneck's SE call (see the module docstring)."""
    return Problem(n, channels, hw, k, element_size, channels_last, has_identity=True,
                   relu_out=True, prologue=True, flat=not channels_last)


def _words(plan: LaunchPlan, problem: Problem, backward: bool) -> str:
    """A plan in words: "+gemv" (FC2 or FC1-backward in the last pass), "+K/s" (that FC a
    launch over K in s parts), "+flat" (the flat rescale or dx pass), sample groups."""
    text = plan.strategy
    if plan.strategy == "split":
        text += "+gemv" if plan.gemv_in_stream else ""
        to_c = not plan.gemv_in_stream and (backward or not problem.single_fc)
        text += f"+K/{plan.fc_to_c.splits}" if to_c and plan.fc_to_c.splits > 1 else ""
        text += "+flat" if plan.flat_rescale else ""
        if plan.sample_group < problem.n:
            text += f"/groups of {plan.sample_group}"
    return text


def _describe(problem: Problem, spec: GpuSpec) -> tuple[str, int, int]:
    """(the forward's and the backward's plans in words, forward launches, backward
    launches)."""
    forward, backward = plan_launch(problem, spec), plan_launch(problem, spec, "split", True)
    return (f"{_words(forward, problem, False)} / {_words(backward, problem, True)}",
            len(forward_launches(problem, forward, spec)),
            len(backward_launches(problem, backward, spec)))


def plan_rows(spec: GpuSpec, batch_sizes=BATCH_SIZES, layouts=("nchw",)) -> list[dict]:
    """One row per (site, N, layout): the plan and the modelled microseconds."""
    rows = []
    for site in resnet50_sites():
        for n in batch_sizes:
            for layout in layouts:
                p = site_problem(site.channels, site.size**2, site.stacked_width, n,
                                 layout == "channels_last")
                words, fwd_launches, bwd_launches = _describe(p, spec)
                row = dict(site=site.name, n=n, layout=layout, plan=words,
                           launches=f"{fwd_launches}+{bwd_launches}")
                for training in (False, True):
                    pass_name = "fwd+bwd" if training else "fwd"
                    forward = training_forward(p) if training else p
                    fused = model_seconds(forward, plan_launch(forward, spec), spec, training)
                    floor = floor_seconds(p, spec, training)
                    compiled = compile_seconds(p, spec, training)
                    row[f"{pass_name} fused us"] = round(fused * 1e6, 1)
                    row[f"{pass_name} floor us"] = round(floor * 1e6, 1)
                    row[f"{pass_name} compile us"] = round(compiled * 1e6, 1)
                    row[f"{pass_name} fused/floor"] = round(fused / floor, 2)
                    row[f"{pass_name} fused/compile"] = round(fused / compiled, 2)
                rows.append(row)
    return rows


def resolve_spec(name: str | None) -> tuple[GpuSpec, str]:
    """The GPU to plan for: ``name`` (h100, a100), else this machine's GPU, else an H100."""
    if name is not None:
        return GPUS[name], f"{GPUS[name].name} (modelled)"
    if torch.cuda.is_available():
        spec = device_spec(torch.device("cuda"))
        return spec, f"{spec.name}, this machine's GPU (modelled)"
    return GPUS["h100"], f"{GPUS['h100'].name} (modelled; no GPU here)"


def markdown_table(rows: list[dict]) -> str:
    """The rows as the README's table: microseconds and the ratios to the floor and to
    torch.compile, forward and forward + backward."""
    lines = ["| site | N | layout | plan | launches | fwd µs | floor µs | compile µs "
             "| fused / floor | fused / compile | fwd+bwd µs | fused / floor | fused / compile |",
             "|" + " --- |" * 13]
    for r in rows:
        site = r["site"].replace("SE-ResNet-50", "SE").replace("SENetV2-ResNet-50", "SaE")
        lines.append(
            f"| {site} | {r['n']} | {r['layout']} | {r['plan']} | {r['launches']} "
            f"| {r['fwd fused us']} | {r['fwd floor us']} | {r['fwd compile us']} "
            f"| {r['fwd fused/floor']} | {r['fwd fused/compile']} | {r['fwd+bwd fused us']} "
            f"| {r['fwd+bwd fused/floor']} | {r['fwd+bwd fused/compile']} |")
    return "\n".join(lines)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)
