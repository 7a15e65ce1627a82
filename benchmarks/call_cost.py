"""The fused CPU op's fixed cost per call: a call on a 1 x C x 1 x 1 input, where the
arithmetic is negligible, against a ``clone`` of the same tensor (the least a call that
returns a new tensor costs), through each way there is to call it. No grad, one thread
by default, every way timed interleaved in one process (``tools/timing``).

    python benchmarks/call_cost.py
    python benchmarks/call_cost.py --channels 64 --rounds 11 --threads 1

Rows: the op through its typed entry (``kernels.cpu.op_entry()``, what the fused modules
and ``sae`` call) and through ``torch.ops``; the functional ``sae``; ``FusedSE`` and
``FusedSaE`` (four branches) called as modules.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from sae_kernels import FusedSaE, FusedSE, sae
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.options import ACTIVATIONS, GATES
from sae_kernels.tools.timing import measure_interleaved


def calls(channels: int) -> dict[str, Callable[[], object]]:
    """Each way of calling the op on one 1 x channels x 1 x 1 input, by name."""
    x = torch.randn(1, channels, 1, 1)
    width = max(channels // 4, 1)  # of each branch
    se = FusedSE(channels, rd_channels=width).eval()
    sae_module = FusedSaE(channels, cardinality=4, rd_channels=width).eval()
    # the tensors bound here: a module attribute lookup in the timed call costs ~0.3 us
    w1, b1, w2, b2 = se.branches[0].weight, se.branches[0].bias, se.excite.weight, se.excite.bias
    weights, biases = [w1], [b1]
    # the op's arguments after the tensors: act, gate, residual, relu_out, the prologue's
    options = (ACTIVATIONS.index("relu"), GATES.index("sigmoid"), False, False, None, None, 0)
    entry, op = cpu_kernels.op_entry(), torch.ops.sae_kernels.cpu_sae
    return {
        "x.clone()": x.clone,
        "op, typed entry": lambda: entry(x, weights, biases, w2, b2, None, *options),
        "op, torch.ops": lambda: op(x, weights, biases, w2, b2, None, *options),
        "sae_kernels.sae": lambda: sae(x, w1, b1, w2, b2),
        "FusedSE module": lambda: se(x),
        "FusedSaE module (4 branches)": lambda: sae_module(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("call_cost: the C++ CPU kernels are not available")
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        times = measure_interleaved(calls(args.channels), args.rounds, torch.device("cpu"))
    clone = times["x.clone()"].median
    print(f"1 x {args.channels} x 1 x 1, float32, no grad, {args.threads} thread(s), "
          f"medians of {args.rounds} rounds")
    print("| call | µs | over a clone |\n| --- | --- | --- |")
    for name, stats in times.items():
        over = "" if name == "x.clone()" else f"+{stats.median - clone:.1f}"
        print(f"| {name} | {stats.median:.1f} | {over} |")


if __name__ == "__main__":
    main()
