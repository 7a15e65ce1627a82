"""``sae-kernels profile MODEL``: the share of a model's step time spent inside its SE
blocks, per block and in total, before and after conversion to the fused blocks.

Each SE site's forward runs inside a profiler range ``se:<path>``. Its backward is found
through autograd's sequence numbers: each forward op recorded inside the range carries one,
and the backward node it created runs as ``autograd::engine::evaluate_function: <node>``
with the same number and the forward thread's id (the fused C++ op and the fused custom op
included). On CPU a share is the ops' CPU time over the steps' CPU time; on CUDA it is the
time of the kernels they launched over the time of all the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import importlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, record_function

from ..convert import Converted, Skipped, convert
from ..models import DEPTHS, se_resnet, senetv2_resnet
from .launches import profiled
from .timing import measure_interleaved

#: This package's models by name (the reference blocks; the profiler converts them).
OWN_MODELS: dict[str, Callable[[], nn.Module]] = {
    f"{builder.__name__}{depth}": functools.partial(builder, depth, fused=False)
    for builder in (se_resnet, senetv2_resnet) for depth in DEPTHS
}
MODES = ("inference", "training")
STAGES = ("reference", "fused")
DEFAULT_IMAGE_SIZE = 224
SITE_RANGE = "se:"
STEP_RANGE = "step"
BACKWARD_RANGE = "autograd::engine::evaluate_function: "


class ProfileError(ValueError):
    """A model that cannot be profiled, or a missing optional dependency (for the user)."""


@dataclasses.dataclass
class StageProfile:
    """One model (reference or fused) in one mode: seconds per step, in all and per SE site."""

    step_seconds: float
    site_seconds: dict[str, float]

    @property
    def se_share(self) -> float:
        return sum(self.site_seconds.values()) / self.step_seconds

    def share(self, path: str) -> float:
        return self.site_seconds[path] / self.step_seconds

    def to_json(self) -> dict:
        return {"step_ms": self.step_seconds * 1e3, "se_share": self.se_share,
                "sites": {path: {"ms": seconds * 1e3, "share": self.share(path)}
                          for path, seconds in self.site_seconds.items()}}


@dataclasses.dataclass
class ModeProfile:
    """Reference and fused model in one mode, profiled, and timed end to end (median step)."""

    reference: StageProfile
    fused: StageProfile
    reference_seconds: float
    fused_seconds: float

    @property
    def speedup(self) -> float:
        return self.reference_seconds / self.fused_seconds


@dataclasses.dataclass
class ProfileReport:
    """What :func:`profile_model` measured; ``skipped`` holds the blocks conversion left
    as they are, per mode."""

    model: str
    device: str
    dtype: str
    batch_size: int
    input_shape: tuple[int, int, int]
    sites: list[Converted]
    modes: dict[str, ModeProfile]
    skipped: dict[str, list[Skipped]]
    traces: list[Path]

    def to_json(self) -> dict:
        return {
            "model": self.model, "device": self.device, "dtype": self.dtype,
            "batch_size": self.batch_size, "input_shape": list(self.input_shape),
            "sites": [site.path for site in self.sites],
            "modes": {mode: {"reference": result.reference.to_json(),
                             "fused": result.fused.to_json(),
                             "reference_ms": result.reference_seconds * 1e3,
                             "fused_ms": result.fused_seconds * 1e3, "speedup": result.speedup}
                      for mode, result in self.modes.items()},
            "skipped": {mode: [dataclasses.asdict(block) for block in blocks]
                        for mode, blocks in self.skipped.items()},
            "traces": [str(path) for path in self.traces],
        }


def build_model(name: str, image_size: int | None = None,
                ) -> tuple[nn.Module, tuple[int, int, int]]:
    """Model ``name`` with random weights and its input shape (C, H, W): one of this
    package's models, else a torchvision classifier, else a timm model."""
    torch.manual_seed(0)
    size = image_size or DEFAULT_IMAGE_SIZE
    if name in OWN_MODELS:
        return OWN_MODELS[name](), (3, size, size)
    torchvision = _optional("torchvision")
    if torchvision is not None and name in _torchvision_models(torchvision):
        return torchvision.models.get_model(name, weights=None), (3, size, size)
    timm = _optional("timm")
    if timm is not None and timm.is_model(name):
        model = timm.create_model(name, pretrained=False)
        channels, height, width = timm.data.resolve_data_config(model=model)["input_size"]
        return model, (channels, image_size or height, image_size or width)
    known = dict.fromkeys([*OWN_MODELS, *(_torchvision_models(torchvision) if torchvision else []),
                           *(timm.list_models() if timm else [])])
    close = difflib.get_close_matches(name, known, n=3)
    missing = [library for library, module in (("torchvision", torchvision), ("timm", timm))
               if module is None]
    raise ProfileError(
        f"unknown model {name!r}: not a timm model, a torchvision classifier or one of "
        f"sae_kernels' se_resnet<depth>, senetv2_resnet<depth> "
        f"(depth {', '.join(map(str, DEPTHS))})"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + (f" ({' and '.join(missing)} not installed)" if missing else ""))


def profile_model(name: str, batch_size: int = 2, image_size: int | None = None, steps: int = 3,
                  device: str | torch.device = "cpu", trace_dir: str | Path | None = None,
                  modes: Sequence[str] = MODES, timed_steps: int = 10) -> ProfileReport:
    """Profile ``steps`` steps of model ``name`` per mode, before and after conversion, and
    time ``timed_steps`` more of each without the profiler for the end-to-end speedup. A
    Chrome trace per model and mode goes to ``trace_dir`` if given."""
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"modes must be among {MODES}, got {sorted(unknown)}")
    device = torch.device(device)
    model, input_shape = build_model(name, image_size)
    model = model.to(device)
    # converted in each mode: a block that folds a BatchNorm converts in eval mode only
    conversions = {mode: convert(model.train(mode == "training")) for mode in modes}
    sites = {c.path: c for _, report in conversions.values() for c in report.converted}
    skipped = {mode: report.skipped for mode, (_, report) in conversions.items()}
    if not sites:
        raise ProfileError(_no_se_block(name, [s for blocks in skipped.values() for s in blocks]))
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
    x = torch.randn(batch_size, *input_shape, device=device)
    results, traces = {}, []
    for mode in modes:
        models = {"reference": model.train(mode == "training"), "fused": conversions[mode][0]}
        steps_by_stage = {stage: model_step(m, x, mode == "training")
                          for stage, m in models.items()}
        # warms both models up, then times them interleaved
        timed = measure_interleaved(steps_by_stage, timed_steps, device)
        seconds = {stage: stats.median / 1e6 for stage, stats in timed.items()}
        stages = {}
        for stage, stage_model in models.items():
            trace = None if trace_dir is None else Path(trace_dir) / f"{stage}-{mode}.json"
            stages[stage] = _profile_stage(stage_model, steps_by_stage[stage], list(sites), steps,
                                           device, trace)
            traces += [trace] if trace else []
        results[mode] = ModeProfile(stages["reference"], stages["fused"], seconds["reference"],
                                    seconds["fused"])
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return ProfileReport(name, str(device), dtype, batch_size, input_shape, list(sites.values()),
                         results, skipped, traces)


def format_report(report: ProfileReport) -> str:
    """A table of each site's share of the step time, reference and fused, per mode; then
    the totals, step times and end-to-end speedups."""
    columns = [(mode, stage) for mode in report.modes for stage in STAGES]
    timed_label = "step ms (median, no profiler)"
    width = max(len(timed_label), *(len(site.path) for site in report.sites))
    variant_width = max(len(site.variant) for site in report.sites)

    def row(label: str, variant: str, channels: str, cells: list[str]) -> str:
        return (f"{label:<{width}}  {variant:<{variant_width}}  {channels:>5}"
                + "".join(f"  {cell:>10}" for cell in cells)).rstrip()

    c, h, w = report.input_shape
    lines = [f"{report.model} on {report.device}, {report.dtype}, batch {report.batch_size}, "
             f"input {c}x{h}x{w}: share of the step time inside each SE block", "",
             row("", "", "", [mode for mode, _ in columns]),
             row("site", "variant", "C", [stage for _, stage in columns])]
    for site in report.sites:
        lines.append(row(site.path, site.variant, str(site.channels),
                         [f"{_stage(report, *col).share(site.path):.1%}" for col in columns]))
    lines.append(row("all SE blocks", "", "",
                     [f"{_stage(report, *col).se_share:.1%}" for col in columns]))
    lines.append(row("step ms (profiled)", "", "",
                     [f"{_stage(report, *col).step_seconds * 1e3:.2f}" for col in columns]))
    timed = [(result.reference_seconds, result.fused_seconds) for result in report.modes.values()]
    lines.append(row(timed_label, "", "",
                     [f"{seconds * 1e3:.2f}" for pair in timed for seconds in pair]))
    lines.append(row("end-to-end speedup", "", "",
                     [cell for result in report.modes.values()
                      for cell in ("", f"{result.speedup:.2f}x")]))
    lines += [f"left as they are in {mode}: {_count_reasons(blocks)}"
              for mode, blocks in report.skipped.items() if blocks]
    return "\n".join(lines)


def plot_report(report: ProfileReport, path: str | Path) -> None:
    """A PNG bar chart of each site's share of the step time, reference and fused, one
    panel per mode."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ProfileError("--plot needs matplotlib (pip install matplotlib)") from error
    paths = [site.path for site in report.sites]
    positions = range(len(paths))
    figure = Figure(figsize=(max(9.0, 0.35 * len(paths) + 2), 4.5 * len(report.modes)),
                    layout="constrained")
    figure.suptitle(f"{report.model} on {report.device}, batch {report.batch_size}: "
                    f"share of the step time inside SE blocks")
    for axes, (mode, result) in zip(figure.subplots(len(report.modes), 1, squeeze=False)[:, 0],
                                    report.modes.items(), strict=True):
        for offset, stage in ((-0.2, "reference"), (0.2, "fused")):
            profiled = getattr(result, stage)
            axes.bar([p + offset for p in positions], [100 * profiled.share(p) for p in paths],
                     width=0.4, label=f"{stage}: all SE blocks {profiled.se_share:.1%}")
        axes.set_title(f"{mode}: SE blocks {result.reference.se_share:.1%} of the step -> "
                       f"{result.fused.se_share:.1%} fused, end-to-end {result.speedup:.2f}x",
                       fontsize="medium")
        axes.set_xticks(list(positions), paths, rotation=90, fontsize="small")
        axes.set_xlabel("SE site")
        axes.set_ylabel("% of step time")
        axes.legend()
    figure.savefig(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``sae-kernels profile``."""
    parser.add_argument("model", help="a timm or torchvision model name, or one of sae_kernels' "
                        "(se_resnet50, senetv2_resnet50, ...); built with random weights")
    parser.add_argument("--batch-size", type=int, default=2, help="default 2")
    parser.add_argument("--image-size", type=int,
                        help="input height and width (default: timm's config, else 224)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--trace-dir", type=Path,
                        help="where the Chrome traces go (default profile-MODEL)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="a bar chart of the shares")
    parser.add_argument("--json", type=Path, metavar="FILE", help="the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Profile, print the table, write the plot and JSON; 2 if the model cannot be profiled."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = profile_model(args.model, args.batch_size, args.image_size, args.steps, device,
                               args.trace_dir or Path(f"profile-{args.model}"),
                               MODES if args.mode == "both" else (args.mode,))
        print(format_report(report))
        if args.plot:
            plot_report(report, args.plot)
            print(f"plot: {args.plot}")
    except ProfileError as error:
        print(f"sae-kernels profile: {error}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"report: {args.json}")
    print(f"Chrome traces: {', '.join(map(str, report.traces))}")
    return 0


def _optional(library: str) -> ModuleType | None:
    try:
        return importlib.import_module(library)
    except ImportError:
        return None


def _torchvision_models(torchvision: ModuleType) -> list[str]:
    """torchvision's image classifiers (not its detection, segmentation or video models)."""
    return torchvision.models.list_models(torchvision.models)


def _no_se_block(name: str, skipped: list[Skipped]) -> str:
    message = f"{name} has no SE block that sae_kernels converts"
    return message + (f" (left as they are: {_count_reasons(skipped)})" if skipped else "")


def _count_reasons(skipped: list[Skipped]) -> str:
    """The blocks left unconverted, counted by variant and reason."""
    reasons = Counter(f"{block.variant}: {block.reason}" for block in skipped)
    return "; ".join(f"{count} x {reason}" for reason, count in reasons.items())


def _stage(report: ProfileReport, mode: str, stage: str) -> StageProfile:
    return getattr(report.modes[mode], stage)


def model_step(model: nn.Module, x: torch.Tensor, training: bool) -> Callable[[], object]:
    """One inference step (inference mode), or one training step (forward, backward of the
    output's mean, SGD update)."""
    if not training:
        def infer() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return infer
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train() -> None:
        model(x).float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_stage(model: nn.Module, step: Callable[[], None], sites: list[str], steps: int,
                   device: torch.device, trace: Path | None) -> StageProfile:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with _site_ranges(model, sites), profiled(activities=activities) as profiler:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
                _synchronize(device)
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    site_us, step_us = _attribute(profiler.events(), kernel_time=device.type == "cuda")
    return StageProfile(step_us / steps / 1e6,
                        {path: site_us[path] / steps / 1e6 for path in sites})


@contextlib.contextmanager
def _site_ranges(model: nn.Module, sites: list[str]) -> Iterator[None]:
    """Each site's forward inside a profiler range ``se:<path>`` (hooks, not a wrapper, so
    that the module stays as it is for anything else that looks at it)."""
    open_ranges: dict[str, record_function] = {}
    handles = []
    for path in sites:
        def enter(module, args, path=path) -> None:
            open_ranges[path] = record_function(SITE_RANGE + path).__enter__()

        def leave(module, args, output, path=path) -> None:
            open_ranges.pop(path).__exit__(None, None, None)

        module = model.get_submodule(path)
        handles += [module.register_forward_pre_hook(enter),
                    module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attribute(events: list[FunctionEvent], kernel_time: bool,
               ) -> tuple[defaultdict[str, float], float]:
    """Microseconds per SE site (forward range and backward nodes) and of all the steps:
    CPU time, or with ``kernel_time`` the time of the kernels the ops launched."""
    host = [event for event in events if event.device_type == DeviceType.CPU]
    duration = (lambda e: e.device_time_total) if kernel_time else (lambda e: e.cpu_time_total)
    site_us: defaultdict[str, float] = defaultdict(float)
    site_of_node = {}  # (forward thread, sequence number) -> site
    for event in host:
        if event.name.startswith(SITE_RANGE):
            site = event.name.removeprefix(SITE_RANGE)
            site_us[site] += duration(event)
            for op in _subtree(event):
                if op.sequence_nr >= 0:
                    site_of_node[op.thread, op.sequence_nr] = site
    for event in host:
        site = site_of_node.get((event.fwd_thread, event.sequence_nr))
        if site and event.name.startswith(BACKWARD_RANGE) and not _inside_backward(event):
            site_us[site] += duration(event)
    if kernel_time:
        total = sum(kernel.duration for event in host for kernel in event.kernels)
    else:
        total = sum(event.cpu_time_total for event in host if event.name == STEP_RANGE)
    return site_us, total


def _subtree(event: FunctionEvent) -> Iterator[FunctionEvent]:
    pending = list(event.cpu_children)
    while pending:
        child = pending.pop()
        yield child
        pending += child.cpu_children


def _inside_backward(event: FunctionEvent) -> bool:
    """Whether ``event`` runs inside another backward node (reentrant backward): counted there."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(BACKWARD_RANGE):
            return True
        parent = parent.cpu_parent
    return False
