"""``sae-kernels bench --models``: whole networks end to end, with and without ``convert``,
eager and under ``torch.compile``, and (inference, CPU) the same network in ONNX Runtime.

Variants of one (model, batch size, mode), built from one model and timed interleaved in one
process (``timing``):

    eager             the model as built
    convert           ``sae_kernels.convert(model)[0]``
    compile           ``torch.compile(model)``
    compile(convert)  ``torch.compile(convert(model)[0])``
    se-free           the model with each SE block that ``convert`` finds passing x through
                      (:class:`FreeSE`): the time no SE implementation can reach, since the
                      SE's pool, weights and rescale cost something, so ``se-free / eager``
                      bounds what ``convert / eager`` can be (with more where a converted
                      block absorbs neighbours that ``se-free`` keeps)
    compile(se-free)  ``torch.compile`` of it: the bound of ``compile(convert) / compile``
    onnxruntime       the original model exported to ONNX (the dynamo exporter, else the
                      TorchScript one), run by ``onnxruntime`` on its CPU provider with torch's
                      thread count, its threads not spinning between runs; inference only,
                      and only where onnx and onnxruntime import; its output is checked
                      against eager's once per case

A step is a forward under ``torch.inference_mode()`` (model in eval), or in training a
forward, a backward of the output's mean and an SGD update (model in train mode; each
variant on its own copy of the model and its own optimizer). Speedups are the baseline's
median time over the variant's, so above 1 the variant is faster.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..convert import ConversionReport, convert
from .profile import DEFAULT_IMAGE_SIZE, build_model, model_step
from .timing import Stats, measure_interleaved

VARIANTS = ("eager", "convert", "compile", "compile(convert)", "se-free", "compile(se-free)",
            "onnxruntime")
MODES = ("inference", "training")
BATCH_SIZES = (1, 8)
#: Ratio name -> (variant, baseline); the ratio is the baseline's time over the variant's.
SPEEDUPS = {
    "convert / eager": ("convert", "eager"),
    "compile(convert) / compile": ("compile(convert)", "compile"),
    "se-free / eager": ("se-free", "eager"),
    "compile(se-free) / compile": ("compile(se-free)", "compile"),
    "onnxruntime / eager": ("onnxruntime", "eager"),
    "onnxruntime / compile": ("onnxruntime", "compile"),
}
#: ONNX Runtime's output matches eager's when max |ort - eager| / max |eager| is below this.
ONNX_TOLERANCE = 1e-3
#: Variants whose failure is reported rather than raised (a failed compile or export is a
#: finding about the model; a failing eager or convert step is a bug).
_MAY_FAIL = ("compile", "compile(convert)", "compile(se-free)", "onnxruntime")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class Model(NamedTuple):
    """A network to measure, and its input shape (C, H, W)."""

    name: str
    module: nn.Module
    input_shape: tuple[int, int, int]


def build(name: str, image_size: int = DEFAULT_IMAGE_SIZE) -> Model:
    """Model ``name`` as ``sae-kernels profile`` builds it (this package's models on the
    reference blocks, so that ``convert`` has them to convert), with random BatchNorms.
    Raises ``ProfileError`` (a ValueError) for a name that is no known model."""
    module, input_shape = build_model(name, image_size)
    return Model(name, randomize_batchnorm(module), input_shape)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of ``model`` random running statistics and affine parameters
    (in place; returns ``model``).

    A freshly built network has running means of 0 and variances of 1, and timm's ResNets
    (``zero_init_last``) start the last BatchNorm of each residual branch, right in front of
    its SE block, with a gamma of 0: the block then sees only zeros, the network's output
    does not depend on it (so comparing outputs checks nothing there), and the timings are
    of all-zero data that no trained network runs on. Random statistics and affine
    parameters of the order of a trained network's, drawn from a fixed seed, make every
    block's work real and the runs repeatable."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(size: int) -> torch.Tensor:
        return torch.empty(size).uniform_(0.5, 1.5, generator=generator)

    def normal(size: int) -> torch.Tensor:
        return 0.1 * torch.randn(size, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BATCHNORMS):
                continue
            size = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(normal(size))
                module.running_var.copy_(uniform(size))
            if module.affine:
                module.weight.copy_(uniform(size))
                module.bias.copy_(normal(size))
    return model


def onnxruntime_unavailable(device: torch.device) -> str | None:
    """Why the onnxruntime variant cannot run here (a one-line note), or None if it can."""
    if device.type != "cpu":
        return (f"onnxruntime skipped: it runs on ONNX Runtime's CPU provider, the device is "
                f"{device}")
    for library in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(library)
        except ImportError:
            return (f"onnxruntime skipped: {library} is not installed "
                    "(pip install onnx onnxscript onnxruntime)")
    return None


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's output against eager's on the same input."""

    exporter: str  # "dynamo" or "legacy" (TorchScript)
    relative_error: float  # max |ort - eager| / max |eager|

    @property
    def match(self) -> bool:
        return self.relative_error < ONNX_TOLERANCE


@dataclasses.dataclass
class ModelResult:
    """The measurements of one (model, batch size, mode)."""

    model: str
    n: int
    mode: str
    input_shape: tuple[int, int, int]
    #: Microseconds per step, per variant timed.
    times: dict[str, Stats]
    #: SE blocks that convert replaced (None when no converted variant ran).
    converted_blocks: int | None
    onnx_check: OnnxCheck | None
    #: Why a variant was not timed (a failed compile or export).
    errors: dict[str, str]

    def ms(self, variant: str) -> float | None:
        """The variant's median milliseconds per step (None if not timed)."""
        return self.times[variant].median / 1e3 if variant in self.times else None

    def speedup(self, name: str) -> float | None:
        """Speedup ``name`` of ``SPEEDUPS``: the baseline's median over the variant's."""
        variant, baseline = SPEEDUPS[name]
        if variant not in self.times or baseline not in self.times:
            return None
        return self.times[baseline].median / self.times[variant].median

    def to_json(self) -> dict:
        return {
            "model": self.model, "n": self.n, "mode": self.mode,
            "input_shape": list(self.input_shape),
            "latency_ms": {v: {"median": s.median / 1e3, "p20": s.p20 / 1e3,
                               "p80": s.p80 / 1e3} for v, s in self.times.items()},
            "speedups": {name: self.speedup(name) for name in SPEEDUPS},
            "converted_blocks": self.converted_blocks,
            "onnxruntime_check": None if self.onnx_check is None else {
                **dataclasses.asdict(self.onnx_check), "match": self.onnx_check.match},
            "errors": self.errors,
        }


def run_case(model: Model, n: int, mode: str, variants: list[str], rounds: int,
             device: torch.device) -> ModelResult:
    """Build the variants of ``model`` at batch size ``n`` in ``mode``, run each twice (the
    first call compiles, the backward included), then time them interleaved."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    training = mode == "training"
    torch._dynamo.reset()  # a fresh compile per case: static shapes for this batch size
    base = model.module.to(device).train(training)
    x = torch.randn(n, *model.input_shape, device=device)
    calls, errors, converted, onnx_check = {}, {}, None, None
    # One compile thread: a pool of workers would share the cores with the timings.
    with torch._inductor.config.patch(compile_threads=1):
        for variant in variants:
            if variant == "onnxruntime" and training:
                continue
            try:
                if variant == "onnxruntime":
                    call, onnx_check = _onnxruntime_call(base, x)
                else:
                    module, report = _variant_module(variant, base, training)
                    converted = converted if report is None else len(report.converted)
                    call = model_step(module, x, training)
                call()
                call()
            except Exception as error:
                if variant not in _MAY_FAIL:
                    raise
                errors[variant] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                continue
            calls[variant] = call
        times = measure_interleaved(calls, rounds, device)
    return ModelResult(model.name, n, mode, model.input_shape, times, converted, onnx_check,
                       errors)


def _variant_module(variant: str, base: nn.Module, training: bool
                    ) -> tuple[nn.Module, ConversionReport | None]:
    """The module of ``variant`` and, for the converted ones, convert's report. In training
    every variant gets its own copy (convert copies anyway), so that the steps of one do not
    change the weights of another."""
    report = None
    if "convert" in variant:
        module, report = convert(base)
    elif "se-free" in variant:
        module = without_se(base, [c.path for c in convert(base)[1].converted])
    else:
        module = copy.deepcopy(base) if training else base
    return (torch.compile(module) if variant.startswith("compile") else module), report


class FreeSE(nn.Module):
    """An SE block's place in the ``se-free`` variant: x, as a gate of 1 leaves it, then the
    shortcut add and ReLU of a block that takes ``identity`` (this package's), which the
    block around a timm or torchvision SE does itself."""

    def __init__(self, act_out: str) -> None:
        super().__init__()
        self.act_out = act_out

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        if identity is None:
            return x
        return torch.relu(x + identity) if self.act_out == "relu" else x + identity


def without_se(model: nn.Module, se_paths: list[str]) -> nn.Module:
    """A copy of ``model`` with a :class:`FreeSE` in place of each SE block at ``se_paths``
    (the paths of convert's report)."""
    model = copy.deepcopy(model)
    for path in se_paths:
        parent, _, name = path.rpartition(".")
        act_out = getattr(model.get_submodule(path), "act_out", "none")
        setattr(model.get_submodule(parent), name, FreeSE(act_out))
    return model


def _onnxruntime_call(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[], object], OnnxCheck]:
    """An inference step of ``model`` (in eval mode, on CPU) exported to ONNX and run by
    ONNX Runtime, and the check of its output against eager's."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' tracer warnings
        path = Path(folder) / "model.onnx"
        try:
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
            exporter = "dynamo"
        except Exception:
            torch.onnx.export(model, (x,), path, dynamo=False)
            exporter = "legacy"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Spinning threads would hold the cores after each run, into the next variant's
        # timing: here they slowed the torch variants down about twice.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        expected = model(x)
    got = torch.from_numpy(session.run(None, feed)[0])
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    return (lambda: session.run(None, feed)), OnnxCheck(exporter, error)


def summarize(results: list[ModelResult]) -> dict[str, dict[str, float | int | None]]:
    """Per mode: the number of rows and the median of each speedup over them."""
    summary = {}
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        if rows:
            summary[mode] = {"rows": len(rows)} | {
                name: _median([s for r in rows if (s := r.speedup(name)) is not None])
                for name in SPEEDUPS}
    return summary


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# What the mode shows and writes: the table, notes, summary, JSON and plot.

_TIME_COLUMNS = [f"{v} ms" for v in VARIANTS]


def table_header(model_width: int) -> str:
    """The table's header and separator lines (markdown), model names ``model_width`` wide."""
    cells = ["model".ljust(model_width), "N".rjust(3), "mode".ljust(9), *_TIME_COLUMNS,
             *SPEEDUPS]
    return _table_line(cells) + "\n" + _table_line(["-" * len(c) for c in cells])


def format_row(result: ModelResult, model_width: int) -> str:
    """One table line: median ms per variant, then the speedups ("-" where not timed)."""
    cells = [result.model.ljust(model_width), str(result.n).rjust(3), result.mode.ljust(9),
             *(_fmt(result.ms(v)).rjust(len(c)) for v, c in zip(VARIANTS, _TIME_COLUMNS,
                                                                   strict=True)),
             *(_fmt(result.speedup(name)).rjust(len(name)) for name in SPEEDUPS)]
    return _table_line(cells)


def format_notes(result: ModelResult) -> list[str]:
    """What a row's cells do not say: failed variants, the ONNX Runtime output check and
    a model that convert found nothing to convert in."""
    label = f"{result.model} N={result.n} {result.mode}"
    notes = [f"{label}: {variant} failed: {error}" for variant, error in result.errors.items()]
    if result.onnx_check is not None:
        check = result.onnx_check
        notes.append(f"{label}: onnxruntime output vs eager: max |diff| / max |eager| = "
                     f"{check.relative_error:.1e}, {'matches' if check.match else 'MISMATCH'} "
                     f"(< {ONNX_TOLERANCE:g}; {check.exporter} exporter)")
    if result.converted_blocks == 0:
        notes.append(f"{label}: convert found no SE block to convert")
    return notes


def format_summary(summary: dict[str, dict]) -> str:
    """One line per mode: the median of each speedup column over its rows."""
    return "\n".join(
        f"median over {stats['rows']} {mode} rows: "
        + ", ".join(f"{name} {_fmt(stats[name])}" for name in SPEEDUPS)
        for mode, stats in summary.items())


def write_json(path: str | Path, environment: dict, results: list[ModelResult],
               summary: dict, notes: list[str]) -> None:
    """Everything measured; per model its input shape and converted SE blocks per mode."""
    import json

    models: dict[str, dict] = {}
    for r in results:
        entry = models.setdefault(r.model, {"input_shape": list(r.input_shape),
                                            "converted_blocks": {}})
        entry["converted_blocks"][r.mode] = r.converted_blocks
    with open(path, "w") as f:
        json.dump({"environment": environment, "models": models,
                   "results": [r.to_json() for r in results], "summary": summary,
                   "notes": notes}, f, indent=2)


def plot(path: str | Path, results: list[ModelResult], device: str) -> None:
    """Per mode, grouped bars of the two speedups per (model, N), drawn from 1 (above:
    faster) on a log-2 axis (a ratio and its inverse are as far from 1), each labelled with
    its value, and a black tick at its SE-free bound where that variant was timed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    modes = list(dict.fromkeys(r.mode for r in results))
    per_mode = max(sum(r.mode == mode for r in results) for mode in modes)
    figure = Figure(figsize=(max(6.0, 2 + 1.6 * per_mode), 1 + 3.6 * len(modes)),
                    layout="constrained")
    figure.suptitle(f"{device}, fp32: end-to-end speedup of the converted model")
    # (speedup, its bound, label)
    pairs = [("convert / eager", "se-free / eager", "convert over eager"),
             ("compile(convert) / compile", "compile(se-free) / compile",
              "compile(convert) over compile")]
    for axes, mode in zip(figure.subplots(len(modes), 1, squeeze=False)[:, 0], modes,
                          strict=True):
        rows = [r for r in results if r.mode == mode]
        positions = range(len(rows))
        values, bound_label = [1.0], "SE-free bound"
        for offset, (name, bound, label) in zip((-0.2, 0.2), pairs, strict=True):
            speedups = [r.speedup(name) for r in rows]
            bounds = {p + offset: b for p, r in zip(positions, rows, strict=True)
                      if (b := r.speedup(bound)) is not None}
            values += [s for s in speedups if s is not None] + list(bounds.values())
            if bounds:
                axes.scatter(list(bounds), list(bounds.values()), marker="_", s=300,
                             color="black", zorder=3, label=bound_label)
                bound_label = None
            bars = axes.bar([p + offset for p in positions],
                            [float("nan") if s is None else s - 1 for s in speedups],
                            bottom=1, width=0.4, label=label)
            axes.bar_label(bars, ["" if s is None else f"{s:.2f}" for s in speedups],
                           fontsize="x-small")
        pad = (max(values) / min(values)) ** 0.15 * 1.02
        axes.set_yscale("log", base=2)
        axes.set_ylim(min(values) / pad, max(values) * pad)
        # powers of 2 over a wide range, else evenly spaced ticks
        wide = max(values) / min(values) > 4
        axes.yaxis.set_major_locator(LogLocator(base=2) if wide else MaxNLocator(nbins=8))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.axhline(1, color="black", linewidth=0.8)
        axes.set_xticks(list(positions), [f"{r.model}\nN={r.n}" for r in rows],
                        fontsize="small")
        axes.set_ylabel("speedup (x)")
        axes.set_title(mode, fontsize="medium")
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
