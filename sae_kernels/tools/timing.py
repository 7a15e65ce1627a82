"""Interleaved latency measurement of several zero-argument calls.

Every round times each call once, in an order rotated from round to round, so that the
machine's drift (other jobs, frequency, caches) lands on all of them alike; statistics are
taken over the rounds. On CPU one timing is ``inner`` back-to-back calls under
``time.perf_counter``, ``inner`` chosen so that it lasts at least ``MIN_TIMING_SECONDS``.
On CUDA each round is a ``triton.testing.do_bench`` (CUDA events around every call, the
L2 cache flushed in between), and the per-call samples of all rounds are pooled.
``measure_interleaved_cold`` times CPU calls one by one after a pass over memory.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch

#: One CPU timing (``inner`` back-to-back calls) lasts at least this long.
MIN_TIMING_SECONDS = 2e-3
#: Calls before timing starts: the first ones pay for allocations, caches and lazy setup.
WARMUP_CALLS = 3
#: Milliseconds of measurement per call per round on CUDA.
CUDA_REP_MS = 25
#: Floats written before each call timed cold: 64 MB, twice the largest L3 measured here.
COLD_FLUSH_FLOATS = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Stats:
    """Microseconds per call: median and the 20th and 80th percentiles."""

    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, micros: list[float]) -> Stats:
        ordered = sorted(micros)

        def percentile(q: float) -> float:
            pos = q * (len(ordered) - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

        return cls(statistics.median(ordered), percentile(0.2), percentile(0.8))


def measure_interleaved(calls: dict[str, Callable[[], object]], rounds: int,
                        device: torch.device) -> dict[str, Stats]:
    """Warm every call up, then time them interleaved over ``rounds`` rounds."""
    warm_up(calls)
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    sync()
    if device.type == "cuda":
        time_round = _cuda_round
    else:
        inner = {name: _calibrate(call) for name, call in calls.items()}

        def time_round(name: str, call: Callable[[], object]) -> list[float]:
            return [1e6 * _timed(call, inner[name]) / inner[name]]

    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in round_order(list(calls), r):
            samples[name] += time_round(name, calls[name])
    return {name: Stats.of(samples[name]) for name in calls}


def measure_interleaved_cold(calls: dict[str, Callable[[], object]], rounds: int,
                             calls_per_round: int = 5) -> dict[str, Stats]:
    """Like :func:`measure_interleaved` on a CPU, with caches as a network leaves them for
    its next layer: before every timed call, untimed, a pass over ``COLD_FLUSH_FLOATS`` of
    memory; each call is timed alone and the statistics are over all of them."""
    flush = torch.zeros(COLD_FLUSH_FLOATS)
    warm_up(calls)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in round_order(list(calls), r):
            for _ in range(calls_per_round):
                flush.add_(1)
                start = time.perf_counter()
                calls[name]()
                samples[name].append(1e6 * (time.perf_counter() - start))
    return {name: Stats.of(samples[name]) for name in calls}


def warm_up(calls: dict[str, Callable[[], object]]) -> None:
    """The first calls pay for allocations, caches and lazy setup: make them untimed."""
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            call()


def round_order(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: rotated by one name a round."""
    return names[r % len(names):] + names[:r % len(names)]


def _no_sync() -> None:
    pass


def _cuda_round(name: str, call: Callable[[], object]) -> list[float]:
    from triton.testing import do_bench

    return [1e3 * ms for ms in do_bench(call, warmup=1, rep=CUDA_REP_MS, return_mode="all")]


def _calibrate(call: Callable[[], object]) -> int:
    """The number of back-to-back calls that lasts about MIN_TIMING_SECONDS, from the
    fastest of three timings so that a noisy one does not shrink it."""
    n = 1
    while (elapsed := _timed(call, n)) < MIN_TIMING_SECONDS:
        n *= 2
    elapsed = min(elapsed, _timed(call, n), _timed(call, n))
    return max(1, math.ceil(n * MIN_TIMING_SECONDS / elapsed))


def _timed(call: Callable[[], object], inner: int) -> float:
    """Seconds taken by ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return time.perf_counter() - start
