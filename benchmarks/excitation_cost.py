"""The excitation of every SE site of a network (FC1, its activation, FC2 and the gate, from
pooled means to the gate) at batch size N, three ways: the composite's ATen ops compiled
by torch.compile (what a compiled graph runs under ``set_under_compile("composite")``),
the same ops in eager mode, and the C++ excitation ``sae_kernels::cpu_excite`` (what it
runs under ``"auto"``, ``dispatch.cpu_excitation_for``). All sites are one call, timed
warm (called back to back) and cold (after a 64 MB pass over memory, as a network's other
layers leave the cache for the next SE site), the ways interleaved (``tools.timing``).

    python benchmarks/excitation_cost.py efficientnet_b0 mobilenetv3_large_100 -n 1 8
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

from sae_kernels import FusedEffectiveSE, convert
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.reference import excitation
from sae_kernels.tools.model_bench import build
from sae_kernels.tools.timing import measure_interleaved, measure_interleaved_cold


def site_operands(name: str) -> list[tuple]:
    """(fc1 weights, fc1 biases, fc2 weight, fc2 bias, act, gate) of each SE block that
    ``convert`` converts in ``name``, read from the converted blocks."""
    model = build(name).module.eval()
    converted, report = convert(copy.deepcopy(model))
    sites = []
    for c in report.converted:
        se = converted.get_submodule(c.path)
        if isinstance(se, FusedEffectiveSE):  # the single-FC form
            sites.append(([se.fc.weight], None if se.fc.bias is None else [se.fc.bias], None,
                          None, "relu", se.gate))
            continue
        biases = None if se.branches[0].bias is None else [b.bias for b in se.branches]
        sites.append(([b.weight for b in se.branches], biases, se.excite.weight,
                      se.excite.bias, se.act, se.gate))
    return sites


def ways(sites: list[tuple]) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    """Each way of computing every site's gate from its pooled means, by name."""
    def run_all(excite, means):
        return [excite(z, *site) for z, site in zip(means, sites, strict=True)]

    return {"compiled ATen": torch.compile(lambda means: run_all(excitation, means)),
            "eager ATen": lambda means: run_all(excitation, means),
            "C++ cpu_excite": lambda means: run_all(cpu_kernels.excitation, means)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("-n", "--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("excitation_cost: the C++ CPU kernels are not available")
    torch.set_num_threads(args.threads)
    print("model | N | sites | weight MB | way | warm µs | cold µs")
    for name in args.models:
        sites = site_operands(name)
        megabytes = sum(4 * sum(w.numel() for w in (*s[0], s[2]) if w is not None)
                        for s in sites) / 1e6
        runs = ways(sites)
        for n in args.batch_sizes:
            means = [torch.randn(n, s[0][0].shape[1]) for s in sites]
            calls = {way: (lambda run=run, means=means: run(means)) for way, run in runs.items()}
            with torch.inference_mode():
                warm = measure_interleaved(calls, args.rounds, torch.device("cpu"))
                cold = measure_interleaved_cold(calls, args.rounds)
            for way in calls:
                print(f"{name} | {n} | {len(sites)} | {megabytes:.2f} | {way} | "
                      f"{warm[way].median:.0f} | {cold[way].median:.0f}", flush=True)


if __name__ == "__main__":
    main()
