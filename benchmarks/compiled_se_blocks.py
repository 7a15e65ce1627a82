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
random gradient).

    python benchmarks/compiled_se_blocks.py efficientnet_b0 mobilenetv3_large_100 -n 1 8
    python benchmarks/compiled_se_blocks.py seresnet50 --training -n 8 --units
    python benchmarks/compiled_se_blocks.py seresnet50 -n 8 --op

``--op`` times a third variant, the converted unit traced with the fused op itself in
place of its ATen composite (``SAE_KERNELS_UNDER_COMPILE=op``, ``dispatch.runs_composite``),
and prints the ratios of both converted variants. A ratio above 1 means the original
unit takes longer than the converted one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics

import torch
from torch import nn

from sae_kernels import convert
from sae_kernels.blocks import FusedResidualBlock
from sae_kernels.tools.model_bench import build
from sae_kernels.tools.timing import measure_interleaved


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


@contextlib.contextmanager
def under_compile(setting: str):
    """``SAE_KERNELS_UNDER_COMPILE=setting`` for what torch.compile traces inside."""
    before = os.environ.get("SAE_KERNELS_UNDER_COMPILE")
    os.environ["SAE_KERNELS_UNDER_COMPILE"] = setting
    try:
        yield
    finally:
        if before is None:
            del os.environ["SAE_KERNELS_UNDER_COMPILE"]
        else:
            os.environ["SAE_KERNELS_UNDER_COMPILE"] = before


def step(module: nn.Module, x: torch.Tensor, training: bool):
    """One call of the compiled ``module`` on x: inference, or forward and backward."""
    if not training:
        def infer() -> None:
            with torch.inference_mode():
                module(x)
        return infer
    grad = torch.randn_like(module(x.requires_grad_(True)))

    def train() -> None:
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
    parser.add_argument("--op", action="store_true",
                        help="also the converted unit traced with the fused op itself")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # variant: (which model, SAE_KERNELS_UNDER_COMPILE while it is traced)
    variants = {"original": ("original", "auto"), "converted": ("converted", "auto")}
    if args.op:
        variants["op"] = ("converted", "op")
    compared = [v for v in variants if v != "original"]
    print("model | N | units | variant | original / variant: median | min | max | slowest unit")
    for name in args.models:
        model = build(name)
        original = model.module.train(args.training)
        converted, report = convert(copy.deepcopy(original))
        paths = units(converted, [c.path for c in report.converted])
        for n in args.batch_sizes:
            x = torch.randn(n, *model.input_shape)
            inputs = unit_inputs(original, paths, x)
            ratios = {variant: {} for variant in compared}
            for path in paths:
                torch._dynamo.reset()
                calls = {}
                for variant, (source, setting) in variants.items():
                    # a copy per variant: dynamo does not guard on the setting
                    whole = original if source == "original" else copy.deepcopy(converted)
                    unit = torch.compile(dict(whole.named_modules())[path])
                    with under_compile(setting):  # traced and compiled here
                        calls[variant] = step(unit, inputs[path].clone(), args.training)
                        calls[variant]()
                times = measure_interleaved(calls, args.rounds, torch.device("cpu"))
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
                      f"{max(values):.2f} | {slowest}")


if __name__ == "__main__":
    main()
