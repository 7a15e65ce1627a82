"""Where the BatchNorm that feeds an SE block goes, measured on whole networks.

``convert`` absorbs a BatchNorm (and its activation) whose output feeds only an SE block
into the fused SE as its prologue: the affine is applied on the fly in the SE's passes
over x. The alternative is the usual inference rewrite, folding the BatchNorm into the
convolution that produces its input (``fuse_conv_bn_eval``: the convolution gains a bias).
This script times both in one process, interleaved, on the converted model:

- ``prologue``: ``convert(model)``, what the package does;
- ``conv_fold``: the same converted model with every absorbed BatchNorm folded into its
  convolution and left as an identity affine (weight 1, bias 0, mean 0, variance 1 - eps),
  so that the fused SE does the same work; only the convolution differs.

    python benchmarks/prologue_vs_conv_fold.py efficientnet_b0 mobilenetv3_large_100
    python benchmarks/prologue_vs_conv_fold.py efficientnet_b0 --compile

A ratio above 1 means the fold takes longer than the prologue.
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from sae_kernels import convert
from sae_kernels.prologue import AbsorbedNorm
from sae_kernels.tools.model_bench import build
from sae_kernels.tools.profile import model_step
from sae_kernels.tools.timing import measure_interleaved


def fold_absorbed_norms(converted: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the converted model with each absorbed BatchNorm folded into the
    convolution just before it (its sibling, Identity modules skipped) and left as an
    identity affine, and how many were folded."""
    model = copy.deepcopy(converted)
    folded = 0
    for parent in list(model.modules()):
        children = [child for child in parent.children() if not isinstance(child, nn.Identity)]
        for conv, norm in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, AbsorbedNorm)):
                continue
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                norm.weight, norm.bias)
            with torch.no_grad():
                norm.weight.fill_(1.0)
                norm.bias.zero_()
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0 - norm.eps)
            folded += 1
    return model, folded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="time torch.compile of both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("model | N | prologue ms | conv_fold ms | conv_fold / prologue | max |difference|")
    for name in args.models:
        model = build(name)
        prologue, _ = convert(model.module.eval())
        conv_fold, folded = fold_absorbed_norms(prologue)
        if folded == 0:
            print(f"{name}: no absorbed BatchNorm right after a convolution")
            continue
        for n in args.batch_sizes:
            torch._dynamo.reset()
            x = torch.randn(n, *model.input_shape)
            variants = {"prologue": prologue, "conv_fold": conv_fold}
            if args.compile:
                variants = {key: torch.compile(module) for key, module in variants.items()}
            calls = {key: model_step(module, x, False) for key, module in variants.items()}
            with torch.no_grad():
                difference = (calls["prologue"]() - calls["conv_fold"]()).abs().max().item()
            calls["conv_fold"]()
            times = measure_interleaved(calls, args.rounds, torch.device("cpu"))
            a, b = times["prologue"].median, times["conv_fold"].median
            print(f"{name} | {n} | {a / 1e3:.1f} | {b / 1e3:.1f} | {b / a:.3f} | {difference:.1e}")


if __name__ == "__main__":
    main()
