"""Each converted block against the original, compiled alone: where a converted model's
SE sites win or lose inside torch.compile, away from the rest of the network.

For every block ``convert`` converted, the unit timed is the module that holds its work
in both models: the fused residual block itself where convert rewrote a whole residual
block, else the module that holds the SE block (timm's ``InvertedResidual`` with its
``bn2`` + activation, which the converted SE absorbs as its prologue in eval mode;
torchvision's MBConv ``block``; this package's ``Bottleneck``). The original unit and
the converted one are each compiled with torch.compile (default settings) and run at the
input the unit gets in the whole model at batch size N, interleaved in one process: in
inference (eval, inference mode) or in training (train mode, forward and backward of a
random gradient). The input is channels_last, as inductor lays out a convolutional
network's activations inside the compiled whole: given NCHW, a unit's graph would convert
its input to channels_last and its output back, work the network does not do, and the
output's conversion fuses into the composite's last kernel but not into the op's.

    python benchmarks/compiled_se_blocks.py efficientnet_b0 mobilenetv3_large_100 -n 1 8
    python benchmarks/compiled_se_blocks.py seresnet50 --training -n 8 --units
    python benchmarks/compiled_se_blocks.py seresnet50 -n 8 --op
    python benchmarks/compiled_se_blocks.py efficientnet_b0 seresnet50 --op --whole
    python benchmarks/compiled_se_blocks.py efficientnet_b0 -n 1 --aten-fcs --whole

``--op`` times a third variant, the converted unit traced with the fused op itself in
place of its ATen composite (``set_under_compile("op")``, ``dispatch.runs_composite``),
and prints the ratios of both converted variants. Every call of a variant runs under its
own setting: the variants' units share their forward's code, and so dynamo's cache of
graphs, in which the setting (a global dynamo guards on) picks the graph. ``--whole``
times the whole networks instead of their units (on NCHW images, as a user calls them).
``--aten-fcs`` times the converted unit under ``set_under_compile("composite")``, its FCs
as ATen ops where ``"auto"`` calls the C++ excitation in inference
(``dispatch.cpu_excitation_for``). ``--no-se`` times the original with its SE blocks
passing x through (``model_bench``'s ``se-free`` variant, ``without_se``): the most any SE
implementation could gain there.
``--cold`` times every call alone after an untimed pass over 64 MB of memory
(``timing.measure_interleaved_cold``): a unit called back to back finds its weights in
cache, where in a network the layers before it have pushed them out.
A ratio above 1 means the original unit takes longer than the converted one.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from sae_kernels import convert
from sae_kernels.blocks import FusedResidualBlock
from sae_kernels.dispatch import set_under_compile, under_compile_setting
from sae_kernels.tools.model_bench import build, without_se
from sae_kernels.tools.timing import measure_interleaved, measure_interleaved_cold


def units(converted: nn.Module, paths: list[str]) -> list[str]:
    """The path of the unit of each converted block of ``converted`` at ``paths`` (see the
    module's docstring)."""
    modules = dict(converted.named_modules())
    chosen = []
    for path in paths:
        unit = path if isinstance(modules[path], FusedResidualBlock) else path.rpartition(".")[0]
        if unit not in chosen:
            chosen.append(unit)
    return chosen


def unit_inputs(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each unit at ``paths`` gets in a forward of ``model`` on ``x``."""
    modules = dict(model.named_modules())
    inputs = {}
    hooks = [modules[path].register_forward_pre_hook(
        lambda module, args, path=path: inputs.setdefault(path, args[0].detach().clone()))
        for path in paths]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def step(module: nn.Module, x: torch.Tensor, training: bool, setting: str):
    """One call of the compiled ``module`` on x under ``setting`` (the first compiles):
    inference, or forward and backward."""
    if not training:
        def infer() -> None:
            set_under_compile(setting)
            with torch.inference_mode():
                module(x)
        return infer
    set_under_compile(setting)
    grad = torch.randn_like(module(x.requires_grad_(True)))

    def train() -> None:
        set_under_compile(setting)
        module(x).backward(grad)
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--training", action="store_true", help="train mode, with backward")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--units", action="store_true", help="print each unit's ratio too")
    parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                        help="the units' inputs' memory format")
    parser.add_argument("--whole", action="store_true",
                        help="the whole networks instead of their units")
    parser.add_argument("--no-se", action="store_true",
                        help="also the original with SE blocks that cost nothing")
    parser.add_argument("--op", action="store_true",
                        help="also the converted unit traced with the fused op itself")
    parser.add_argument("--cold", action="store_true",
                        help="time each call alone after a pass over 64 MB, as in a network")
    parser.add_argument("--aten-fcs", action="store_true",
                        help="also the converted unit traced with the composite's ATen FCs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default_setting = under_compile_setting()
    # variant: (which model, the setting it is traced and run under)
    variants = {"original": ("original", "auto"), "converted": ("converted", "auto")}
    if args.op:
        variants["op"] = ("converted", "op")
    if args.aten_fcs:
        variants["ATen FCs"] = ("converted", "composite")
    if args.no_se:
        variants["no SE"] = ("no SE", "auto")
    compared = [v for v in variants if v != "original"]
    print("model | N | units | variant | original / variant: median | min | max | slowest unit")
    for name in args.models:
        model = build(name)
        original = model.module.train(args.training)
        converted, report = convert(copy.deepcopy(original))
        sources = {"original": original, "converted": converted}
        if args.no_se:
            sources["no SE"] = without_se(original, [c.path for c in report.converted])
        paths = [""] if args.whole else units(converted, [c.path for c in report.converted])
        for n in args.batch_sizes:
            x = torch.randn(n, *model.input_shape)
            layout = (torch.channels_last if args.layout == "channels_last"
                      else torch.contiguous_format)
            inputs = {"": x} if args.whole else {
                path: unit_input.contiguous(memory_format=layout)
                for path, unit_input in unit_inputs(original, paths, x).items()}
            ratios = {variant: {} for variant in compared}
            for path in paths:
                torch._dynamo.reset()
                calls = {}
                for variant, (source, setting) in variants.items():
                    unit = torch.compile(dict(sources[source].named_modules())[path])
                    calls[variant] = step(unit, inputs[path].clone(), args.training, setting)
                    calls[variant]()
                times = (measure_interleaved_cold(calls, args.rounds) if args.cold else
                         measure_interleaved(calls, args.rounds, torch.device("cpu")))
                set_under_compile(default_setting)
                for variant in compared:
                    ratios[variant][path] = times["original"].median / times[variant].median
                if args.units:
                    print(f"  {name} N={n} {path}: " + ", ".join(
                        f"{variant} {ratios[variant][path]:.3f}" for variant in compared))
            for variant in compared:
                values = list(ratios[variant].values())
                slowest = min(ratios[variant], key=ratios[variant].get)
                print(f"{name} | {n} | {len(paths)} | {variant} | "
                      f"{statistics.median(values):.2f} | {min(values):.2f} | "
                      f"{max(values):.2f} | {slowest or '<model>'}")


if __name__ == "__main__":
    main()
