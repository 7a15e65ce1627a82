"""What writing each SE's output over its input buys whole networks in eager inference:
the original, ``convert(model, overwrite_inputs=False)`` (every output in new memory) and
``convert(model)`` (y over the convolution output that only the SE reads), interleaved in
one process, with the page faults each takes per call (``getrusage``).

    python benchmarks/overwrite_inputs.py
    python benchmarks/overwrite_inputs.py --models seresnet50 efficientnet_b0 -n 1 8 --rounds 7
"""

from __future__ import annotations

import argparse
import resource

import torch

from sae_kernels import convert
from sae_kernels.tools.model_bench import build
from sae_kernels.tools.timing import measure_interleaved

MODELS = ("efficientnet_b0", "mobilenetv3_large_100", "seresnet50", "senetv2_resnet50")


def faults_per_call(call, calls: int = 5) -> float:
    """Minor page faults per call, after the timed rounds warmed every variant up."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"float32, 224 x 224, inference, {args.threads} threads, medians of {args.rounds} "
          "interleaved rounds; speedups over eager, page faults per call")
    print("| model | N | eager ms | new outputs | over x | faults: eager / new outputs / "
          "over x |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        model = build(name)
        original = model.module.eval()
        variants = {"eager": original,
                    "new outputs": convert(original, overwrite_inputs=False)[0],
                    "over x": convert(original)[0]}
        for n in args.batch_sizes:
            x = torch.randn(n, *model.input_shape)
            calls = {label: (lambda m=m, x=x: m(x)) for label, m in variants.items()}
            with torch.inference_mode():
                times = measure_interleaved(calls, args.rounds, torch.device("cpu"))
                faults = [faults_per_call(call) for call in calls.values()]
            eager = times["eager"].median
            print(f"| {name} | {n} | {eager / 1e3:.1f} | "
                  f"{eager / times['new outputs'].median:.2f} | "
                  f"{eager / times['over x'].median:.2f} | "
                  f"{' / '.join(f'{f / 1e3:.0f}k' for f in faults)} |", flush=True)


if __name__ == "__main__":
    main()
