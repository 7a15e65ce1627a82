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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("model | N | units | original / converted: median | min | max | slowest unit")
    for name in args.models:
        model = build(name)
        original = model.module.train(args.training)
        converted, report = convert(copy.deepcopy(original))
        paths = units(converted, [c.path for c in report.converted])
        for n in args.batch_sizes:
            x = torch.randn(n, *model.input_shape)
            inputs = unit_inputs(original, paths, x)
            ratios = {}
            for path in paths:
                torch._dynamo.reset()
                calls = {}
                for variant, whole in (("original", original), ("converted", converted)):
                    unit = torch.compile(dict(whole.named_modules())[path])
                    calls[variant] = step(unit, inputs[path].clone(), args.training)
                    calls[variant]()
                times = measure_interleaved(calls, args.rounds, torch.device("cpu"))
                ratios[path] = times["original"].median / times["converted"].median
                if args.units:
                    print(f"  {name} N={n} {path}: {ratios[path]:.3f}")
            values = list(ratios.values())
            slowest = min(ratios, key=ratios.get)
            print(f"{name} | {n} | {len(paths)} | {statistics.median(values):.2f} | "
                  f"{min(values):.2f} | {max(values):.2f} | {slowest}")


if __name__ == "__main__":
    main()
