"""``sae-kernels gpu-check``: the acceptance run on a CUDA GPU, in one command.

Stages, each with its share of the time (under 8 minutes on one H100-class GPU, about 3
with ``--quick``):

1. correctness: the test suite's GPU cases (the Triton kernels on the GPU; every kernel
   and plan option, all dtypes and layouts) in pytest subprocesses, sharded over the CPU
   cores since the kernels' JIT builds dominate, under one deadline. Meanwhile other
   processes build the bench's torch.compile graphs and kernels into inductor's and
   Triton's on-disk caches (stopped before anything is timed).
2. layer bench (``bench``, interleaved CUDA timings, medians): fused vs eager,
   torch.compile and the memory floor, forward and forward+backward, at the SE sites of
   SE-ResNet-50 and SENetV2-ResNet-50, N = 1, 8, 32, 128, bf16, NCHW (and channels_last
   without ``--quick``). The bench times the SE block alone (no ``bn3`` prologue, shortcut
   add or ReLU: it has no variant for the converted bottleneck), and the model is asked
   about that same block. Cases run most wanted first (NCHW forward, NCHW
   forward+backward, then channels_last); those the budget leaves no time for are listed.
3. model vs measurement: per fused time, ``gpu_plan``'s prediction for this GPU and its
   error; the kernel gap and HBM bandwidth refitted to the measurements (least squares
   in log time); the model of torch.compile's kernels against their times. The bench
   times a call with CUDA events after an L2 flush, whose kernel the host's launches
   queue behind: it measures the device's time (``gpu_plan.device_seconds``), and so
   does the model here.

Outputs in ``--out`` (default ``gpu-check/``): ``gpu-check.json`` (everything gathered,
also after a crash), ``gpu-check.md`` (the README table, also printed) and the pytest logs.

Exit status: 0 when every test passed and every stage completed; 1 when a test failed, a
test run timed out or a stage crashed; 2 when torch sees no CUDA device (or
``TRITON_INTERPRET=1`` is set): nothing is checked and nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import gpu_plan
from ..gpu_plan import GpuSpec, Problem
from ..sites import resnet50_sites
from . import bench
from .plan import BATCH_SIZES, site_problem

#: The directory holding ``sae_kernels/`` (a source checkout's root holds ``tests/`` too).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = ("sae-kernels gpu-check: no CUDA device (torch.cuda.is_available() is False): "
           "nothing was checked")
INTERPRETER_ON = ("sae-kernels gpu-check: TRITON_INTERPRET=1 would run the kernels in Triton's "
                  "interpreter; unset it: nothing was checked")
BLOCK = ("the SE block alone, as tools/bench times it: no bn3 prologue, shortcut add or ReLU "
         "epilogue (the bench has no variant for the converted bottleneck); modelled as the "
         "same block")
DTYPE = torch.bfloat16
BENCH_VARIANTS = ("eager", "compile", "fused", "floor")
#: Cache-building processes at most during the tests (each builds one case at a time).
MAX_WARMERS = 4
#: Test shards at most: one pytest process each.
MAX_SHARDS = 8


@dataclass(frozen=True)
class PytestRun:
    """A selection of the test suite: a file and an optional ``-k`` expression."""

    label: str
    path: str
    keyword: str | None = None

    def collect_command(self) -> list[str]:
        keyword = ["-k", self.keyword] if self.keyword else []
        return [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                self.path, *keyword]


@dataclass(frozen=True)
class Settings:
    """What a run covers and the seconds it may take (see the module docstring)."""

    #: the whole run; the bench gets what the tests leave of it, less the reserve
    total_seconds: float
    #: the tests' deadline (collection and every shard)
    test_seconds: float
    #: kept for the model and the report
    reserve_seconds: float
    #: the bench's least time, however long the tests took
    min_bench_seconds: float
    rounds: int
    runs: tuple[PytestRun, ...]
    layouts: tuple[str, ...]


#: All plan options x dtypes x layouts through the kernels; the operator's options and
#: dtypes; the prologue on both Triton strategies.
FULL = Settings(
    total_seconds=460, test_seconds=220, reserve_seconds=15, min_bench_seconds=90, rounds=5,
    runs=(PytestRun("gpu_plan", "tests/test_gpu_plan.py"),
          PytestRun("fused_matrix", "tests/test_fused_matrix.py", "dtypes or options or single_fc"),
          PytestRun("prologue", "tests/test_prologue.py", "triton")),
    layouts=("nchw", "channels_last"))
#: Every kernel and plan option still (test_gpu_plan), fewer activation and epilogue builds.
QUICK = Settings(
    total_seconds=170, test_seconds=80, reserve_seconds=10, min_bench_seconds=40, rounds=3,
    runs=(PytestRun("gpu_plan", "tests/test_gpu_plan.py"),
          PytestRun("fused_matrix", "tests/test_fused_matrix.py", "dtypes or single_fc"),
          PytestRun("prologue", "tests/test_prologue.py", "triton and shapes")),
    layouts=("nchw",))


class Budget:
    """Seconds granted to a stage, counted from its creation."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fits(self, estimate: float) -> bool:
        """Whether something taking ``estimate`` seconds ends within the budget."""
        return self.elapsed() + estimate <= self.seconds


# ----------------------------------------------------------------------------------------
# Stage 1: the tests
# ----------------------------------------------------------------------------------------

_NODE = r"\S+\.py::"
_OUTCOME = re.compile(rf"^(?P<node>{_NODE}.*?) "
                      r"(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: |$)", re.MULTILINE)
_COUNTED = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
            "SKIPPED": "skipped", "XFAIL": "xfailed"}


def parse_collected(text: str) -> list[str]:
    """The node ids of ``pytest --collect-only -q`` output (those listed before its first
    section, such as the warnings summary, which names tests too)."""
    nodes = []
    for line in text.splitlines():
        if line.startswith("="):
            break
        if re.match(_NODE, line):
            nodes.append(line.rstrip())
    return nodes


def parse_outcomes(text: str) -> dict[str, str]:
    """Outcome per node id from ``pytest -v`` output, also from a run cut short; a failure
    (a teardown ERROR after PASSED) is kept over a pass."""
    outcomes: dict[str, str] = {}
    for m in _OUTCOME.finditer(text):
        node, outcome = m["node"], m["outcome"]
        if outcomes.get(node) not in ("FAILED", "ERROR"):
            outcomes[node] = outcome
    return outcomes


def split_shards(node_ids: list[str], shards: int) -> list[list[str]]:
    """Contiguous chunks of near-equal size: neighbouring tests share kernel builds."""
    shards = max(1, min(shards, len(node_ids)))
    size, extra = divmod(len(node_ids), shards)
    chunks, start = [], 0
    for i in range(shards):
        end = start + size + (i < extra)
        chunks.append(node_ids[start:end])
        start = end
    return [c for c in chunks if c]


def tally(collected: dict[str, list[str]], outcomes: dict[str, str]) -> list[dict]:
    """Per selection: its counts, the failures' node ids and the tests that never reported
    (a shard that timed out or crashed)."""
    rows = []
    for label, nodes in collected.items():
        row = dict(label=label, collected=len(nodes), passed=0, failed=0, errors=0, skipped=0,
                   xfailed=0, not_run=0, failures=[])
        for node in nodes:
            outcome = outcomes.get(node)
            row[_COUNTED[outcome] if outcome else "not_run"] += 1
            if outcome in ("FAILED", "ERROR"):
                row["failures"].append(node)
        rows.append(row)
    return rows


def tests_ok(tests: dict) -> bool:
    """Every selection collected something and every collected test passed, skipped or
    xfailed; every pytest process ended by itself with status 0."""
    selections = tests.get("selections", [])
    return (bool(selections) and not tests.get("problems")
            and all(s["returncode"] == 0 and not s["timed_out"] for s in tests["shards"])
            and all(s["collected"] and not (s["failed"] or s["errors"] or s["not_run"])
                    for s in selections))


def _subprocess_env() -> dict[str, str]:
    """This environment with the package importable and the kernels compiled for the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # a run killed at the deadline leaves every line it wrote
    return env


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[tuple[bool, float]]:
    """Wait for every process until ``deadline`` (time.monotonic), killing those still
    running then: (timed out, seconds) per process."""
    start = time.monotonic()
    ended: dict[int, tuple[bool, float]] = {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = (False, time.monotonic() - start)
        if time.monotonic() >= deadline:
            for i, proc in enumerate(procs):
                if i not in ended:
                    proc.kill()
                    proc.wait()
                    ended[i] = (True, time.monotonic() - start)
        time.sleep(0.2)
    return [ended[i] for i in range(len(procs))]


def run_tests(root: Path, runs: tuple[PytestRun, ...], seconds: float, out: Path,
              shards: int, log: Callable[[str], None] = print) -> dict:
    """Collect ``runs`` under ``root``, then run them as ``shards`` concurrent pytest
    processes (``-v``, no ``-x``; logs in ``out``), all under one deadline ``seconds`` away."""
    deadline = time.monotonic() + seconds
    env = _subprocess_env()
    problems: list[str] = []
    collectors = [subprocess.Popen(run.collect_command(), cwd=root, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                  for run in runs]
    collected: dict[str, list[str]] = {}
    for run, proc in zip(runs, collectors, strict=True):
        try:
            text = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            text = proc.communicate()[0]
        collected[run.label] = parse_collected(text)
        if proc.returncode != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])
            problems.append(f"collecting {run.label} ended with status {proc.returncode}: {tail}")
    node_ids = [node for nodes in collected.values() for node in nodes]
    chunks = split_shards(node_ids, shards)
    log(f"[tests] {len(node_ids)} tests in {len(chunks)} pytest processes, "
        f"{max(0.0, deadline - time.monotonic()):.0f} s left")
    procs, logs = [], []
    for i, chunk in enumerate(chunks):
        logs.append(out / f"pytest-{i}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *chunk],
                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT))
    outcomes: dict[str, str] = {}
    shard_rows = []
    for i, (proc, (timed_out, took)) in enumerate(zip(procs, _wait(procs, deadline),
                                                      strict=True)):
        outcomes |= parse_outcomes(logs[i].read_text(errors="replace"))
        shard_rows.append(dict(tests=len(chunks[i]), returncode=proc.returncode,
                               timed_out=timed_out, seconds=round(took, 1), log=str(logs[i])))
        if timed_out:
            problems.append(f"pytest process {i} timed out at the tests' deadline ({seconds:.0f} "
                            f"s); see {logs[i]}")
        elif proc.returncode not in (0, 1):
            problems.append(f"pytest process {i} ended with status {proc.returncode}; "
                            f"see {logs[i]}")
    selections = tally(collected, outcomes)
    for run, row in zip(runs, selections, strict=True):
        row.update(path=run.path, keyword=run.keyword)
    totals = {key: sum(s[key] for s in selections)
              for key in ("collected", "passed", "failed", "errors", "skipped", "xfailed",
                          "not_run")}
    result = dict(selections=selections, shards=shard_rows, totals=totals, problems=problems)
    result["ok"] = tests_ok(result)
    log("[tests] " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    return result


def warm_caches(quick: bool, worker: int, workers: int) -> None:
    """Build this worker's share of the bench's cases once (torch.compile's graph and the
    fused kernels), so that their builds land in inductor's and Triton's on-disk caches."""
    device = torch.device("cuda")
    for case in bench_cases(QUICK if quick else FULL)[worker::workers]:
        torch._dynamo.reset()
        with bench.inductor_settings():
            try:
                reference, x, grad = bench.case_operands(case, DTYPE, device)
                for name in ("fused", "compile"):
                    bench.variant_call(name, reference, x, grad, "auto")()
            except Exception:  # the bench reports what fails
                pass
        gc.collect()


def start_cache_warmers(quick: bool, workers: int) -> list[subprocess.Popen]:
    """``workers`` processes running :func:`warm_caches` (output discarded)."""
    return [subprocess.Popen(
        [sys.executable, "-c", f"from sae_kernels.tools.gpu_check import warm_caches; "
                               f"warm_caches({quick}, {i}, {workers})"],
        cwd=PACKAGE_ROOT, env=_subprocess_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for i in range(workers)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------
# Stage 2: the bench
# ----------------------------------------------------------------------------------------


def bench_cases(settings: Settings) -> list[bench.Case]:
    """The measured cases, most wanted first, so that a run short of time leaves out the
    last: per layout (NCHW first), the forward, then forward+backward."""
    return [case for layout in settings.layouts for mode in bench.MODES
            for case in bench.cases(resnet50_sites(), list(BATCH_SIZES), [layout], [mode])]


def _case_label(case: bench.Case) -> str:
    return f"{case.label} {case.mode}"


def run_bench(cases: list[bench.Case], rounds: int, budget: Budget, device: torch.device,
              log: Callable[[str], None] = print) -> dict:
    """Each case through ``bench.run_case`` while the budget lasts: a case starts only if
    the longest of its mode so far would still end in time. The first case also runs once
    untimed (as ``bench.run_cases`` does), taking the one-off costs out of the timings and
    out of the estimates."""
    rows, not_run, errors = [], [], []
    longest: dict[str, float] = {}
    torch.manual_seed(0)
    for i, case in enumerate(cases):
        if not budget.fits(longest.get(case.mode, 0.0)):
            not_run.append(_case_label(case))
            continue
        start = budget.clock()
        try:
            if i == 0:
                bench.run_case(case, DTYPE, device, list(BENCH_VARIANTS), "auto", rounds=1)
                start = budget.clock()
            result = bench.run_case(case, DTYPE, device, list(BENCH_VARIANTS), "auto", rounds)
        except Exception as e:
            errors.append(f"bench {_case_label(case)}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}")
            log(f"[bench] {_case_label(case)}: {errors[-1]}")
            continue
        finally:
            gc.collect()
        took = budget.clock() - start
        longest[case.mode] = max(longest.get(case.mode, 0.0), took)
        rows.append(result.to_json() | {"seconds": round(took, 2)})
        times = {v: f"{s.median:.1f}" for v, s in result.times.items()}
        log(f"[bench] {_case_label(case)}: " + ", ".join(f"{v} {t} us" for v, t in times.items())
            + "".join(f"; {v} did not run: {err}" for v, err in result.errors.items()))
    return dict(block=BLOCK, dtype=str(DTYPE).removeprefix("torch."), rounds=rounds,
                variants=list(BENCH_VARIANTS), budget_seconds=round(budget.seconds, 1),
                rows=rows, not_run=not_run, errors=errors)


# ----------------------------------------------------------------------------------------
# Stage 3: the model against the measurements
# ----------------------------------------------------------------------------------------


def bench_problem(row: dict) -> Problem:
    """The model's problem for a bench row: ``plan.site_problem``'s block without the
    prologue, identity and ReLU (see ``BLOCK``)."""
    element_size = getattr(torch, row["dtype"]).itemsize
    k = row["cardinality"] * (row["channels"] // row["reduction"])
    problem = site_problem(row["channels"], row["size"] ** 2, k, row["n"],
                           row["layout"] == "channels_last", element_size)
    return dataclasses.replace(problem, has_identity=False, relu_out=False, prologue=False)


@dataclass(frozen=True)
class ModelTerms:
    """A modelled device time in the parts the fit varies: per launch, its HBM bytes and
    its serial tail (``gpu_plan.device_seconds``: gap + max(bytes / bandwidth, tail))."""

    hbm_bytes: tuple[float, ...]
    tail_seconds: tuple[float, ...]

    def seconds(self, kernel_gap_seconds: float, hbm_bytes_per_second: float) -> float:
        return sum(kernel_gap_seconds + max(b / hbm_bytes_per_second, t)
                   for b, t in zip(self.hbm_bytes, self.tail_seconds, strict=True))


@functools.cache
def fused_terms(problem: Problem, spec: GpuSpec, backward: bool) -> ModelTerms:
    """The launches of the plan the dispatcher picks with ``spec`` (forward, or forward and
    backward), as :class:`ModelTerms` (cached: the fit and the rows ask alike)."""
    plan = gpu_plan.plan_launch(problem, spec)
    launches = gpu_plan.forward_launches(problem, plan, spec)
    if backward:
        launches += gpu_plan.backward_launches(
            problem, gpu_plan.plan_launch(problem, spec, "split", backward=True), spec)
    tail_only = dataclasses.replace(spec, kernel_gap_seconds=0.0,
                                    hbm_bytes_per_second=math.inf)
    return ModelTerms(tuple(float(launch.hbm_bytes) for launch in launches),
                      tuple(gpu_plan.device_seconds(launch, tail_only) for launch in launches))


#: The fit's first window around the datasheet constants (factors either side), its grid
#: points per axis, and how many times it zooms in on the best point (+-2 grid steps).
FIT_GAP_SPAN = 100.0
FIT_BANDWIDTH_SPAN = 10.0
FIT_GRID = 41
FIT_ZOOMS = 8


def fit_constants(terms: list[ModelTerms], measured_seconds: list[float],
                  spec: GpuSpec) -> GpuSpec:
    """``spec`` with the kernel gap and HBM bandwidth that minimise the squared log
    error of the model over the measurements: a grid search in log space, zoomed in on
    its best point. Deterministic."""
    width = max(len(t.hbm_bytes) for t in terms)
    hbm = np.zeros((len(terms), width))
    tail = np.zeros((len(terms), width))  # padding adds max(0, 0) = 0
    for i, t in enumerate(terms):
        hbm[i, :len(t.hbm_bytes)] = t.hbm_bytes
        tail[i, :len(t.tail_seconds)] = t.tail_seconds
    launches = np.array([len(t.hbm_bytes) for t in terms], dtype=float)
    target = np.log(np.asarray(measured_seconds, dtype=float))
    windows = [(math.log(spec.kernel_gap_seconds / FIT_GAP_SPAN),
                math.log(spec.kernel_gap_seconds * FIT_GAP_SPAN)),
               (math.log(spec.hbm_bytes_per_second / FIT_BANDWIDTH_SPAN),
                math.log(spec.hbm_bytes_per_second * FIT_BANDWIDTH_SPAN))]
    for _ in range(FIT_ZOOMS):
        log_l, log_b = (np.linspace(lo, hi, FIT_GRID) for lo, hi in windows)
        streams = np.maximum(hbm[None] / np.exp(log_b)[:, None, None], tail[None]).sum(-1)
        predicted = np.exp(log_l)[:, None, None] * launches + streams[None]
        loss = ((np.log(predicted) - target) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(loss), loss.shape)
        windows = [(axis[k] - 2 * (axis[1] - axis[0]), axis[k] + 2 * (axis[1] - axis[0]))
                   for axis, k in ((log_l, i), (log_b, j))]
    return dataclasses.replace(spec, kernel_gap_seconds=float(math.exp(log_l[i])),
                               hbm_bytes_per_second=float(math.exp(log_b[j])))


def error_pct(model: float, measured: float) -> float:
    """(model - measured) / measured, in %."""
    return 100.0 * (model - measured) / measured


def error_stats(errors: list[float]) -> dict:
    """Median and worst |error| in %."""
    magnitudes = [abs(e) for e in errors]
    return dict(cases=len(errors),
                median_abs_pct=round(statistics.median(magnitudes), 1) if errors else None,
                worst_abs_pct=round(max(magnitudes), 1) if errors else None)


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def model_rows(bench_rows: list[dict], spec: GpuSpec, fitted: GpuSpec | None) -> list[dict]:
    """Per bench row with a fused time: the measured medians and their ratios, the model's
    fused time with ``spec`` and with ``fitted`` and their errors, and the model of
    torch.compile's kernels against its measured time."""
    rows = []
    for r in bench_rows:
        latency = {v: s["median"] for v, s in r["latency_us"].items()}
        if "fused" not in latency:
            continue
        backward = r["mode"] == "forward+backward"
        problem = bench_problem(r)
        terms = fused_terms(problem, spec, backward)
        fused = latency["fused"]
        model_us = 1e6 * terms.seconds(spec.kernel_gap_seconds, spec.hbm_bytes_per_second)
        row = dict(site=r["site"], n=r["n"], layout=r["layout"], mode=r["mode"],
                   plan=gpu_plan.plan_launch(problem, spec).strategy,
                   launches_modelled=len(terms.hbm_bytes),
                   launches_measured=r.get("launches", {}).get("fused"),
                   fused_us=fused, eager_us=latency.get("eager"),
                   compile_us=latency.get("compile"), floor_us=latency.get("floor"),
                   fused_per_compile=_ratio(fused, latency.get("compile")),
                   fused_per_floor=_ratio(fused, latency.get("floor")),
                   model_us=round(model_us, 2),
                   model_error_pct=round(error_pct(model_us, fused), 1))
        if fitted is not None:
            fit_us = 1e6 * terms.seconds(fitted.kernel_gap_seconds,
                                         fitted.hbm_bytes_per_second)
            row |= dict(fit_us=round(fit_us, 2), fit_error_pct=round(error_pct(fit_us, fused), 1))
        compile_model_us = 1e6 * gpu_plan.device_total(
            gpu_plan.compile_launches(problem, spec, backward), spec)
        row["compile_model_us"] = round(compile_model_us, 2)
        row["compile_model_error_pct"] = (round(error_pct(compile_model_us, latency["compile"]), 1)
                                          if "compile" in latency else None)
        rows.append(row)
    return rows


def model_report(bench_rows: list[dict], spec: GpuSpec) -> dict:
    """The model rows, the fitted constants and the errors before and after the fit."""
    measured = [r for r in bench_rows if "fused" in r["latency_us"]]
    fitted = None
    if measured:
        terms = [fused_terms(bench_problem(r), spec, r["mode"] == "forward+backward")
                 for r in measured]
        fitted = fit_constants(terms, [1e-6 * r["latency_us"]["fused"]["median"]
                                       for r in measured], spec)
    rows = model_rows(bench_rows, spec, fitted)
    return dict(spec=dataclasses.asdict(spec),
                fitted=None if fitted is None else dict(
                    kernel_gap_seconds=fitted.kernel_gap_seconds,
                    hbm_bytes_per_second=fitted.hbm_bytes_per_second),
                error_before=error_stats([r["model_error_pct"] for r in rows]),
                error_after=error_stats([r["fit_error_pct"] for r in rows if "fit_error_pct" in r]),
                compile_model_error=error_stats([r["compile_model_error_pct"] for r in rows
                                                 if r["compile_model_error_pct"] is not None]),
                rows=rows)


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    """Pass (every test passed, no stage crashed) and what to read first. A fused case
    slower than torch.compile misses the target but fails nothing."""
    tests = report.get("tests") or {}
    model = report.get("model") or {}
    rows = model.get("rows", [])
    name = "{site} N={n} {layout} {mode}".format
    slower = [name(**r) for r in rows
              if r["fused_per_compile"] is not None and r["fused_per_compile"] > 1]
    without_compile = [name(**r) for r in rows if r["fused_per_compile"] is None]
    passed = bool(tests.get("ok")) and not report.get("stage_errors")
    return dict(passed=passed, exit_status=0 if passed else 1,
                tests=tests.get("totals"), failed_tests=[node for s in tests.get("selections", [])
                                                         for node in s["failures"]],
                stage_errors=list(report.get("stage_errors", [])),
                bench_cases=len((report.get("bench") or {}).get("rows", [])),
                bench_cases_not_run=len((report.get("bench") or {}).get("not_run", [])),
                fused_at_least_compile_speed=bool(rows) and not slower and not without_compile,
                fused_slower_than_compile=slower, cases_without_compile=without_compile,
                model_fitted=model.get("fitted"), model_error_before=model.get("error_before"),
                model_error_after=model.get("error_after"),
                compile_model_error=model.get("compile_model_error"))


def _cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_markdown(report: dict) -> str:
    """One table per mode and layout: measured medians, ratios, the model and its error."""
    env = report["environment"]
    bench_info = report.get("bench") or {}
    model = report.get("model") or {}
    lines = [f"{env['device']}, {bench_info.get('dtype', 'bfloat16')}, torch {env['torch']}, "
             f"triton {env['triton']}: {BLOCK}. Median us per call over "
             f"{bench_info.get('rounds', '-')} interleaved rounds; fused/compile below 1: the "
             f"fused layer is faster; "
             f"model: `sae_kernels.gpu_plan` with this GPU's constants (error: model vs "
             f"measured)."]
    fitted, before, after = model.get("fitted"), model.get("error_before"), model.get("error_after")
    if fitted and before and after:
        lines.append(f"Median / worst |model error| {before['median_abs_pct']}% / "
                     f"{before['worst_abs_pct']}%; with the kernel gap and bandwidth "
                     f"fitted ({fitted['kernel_gap_seconds'] * 1e6:.2f} us, "
                     f"{fitted['hbm_bytes_per_second'] / 1e12:.2f} TB/s): "
                     f"{after['median_abs_pct']}% / {after['worst_abs_pct']}%.")
    rows = model.get("rows", [])
    groups = list(dict.fromkeys((r["mode"], r["layout"]) for r in rows))
    for mode, layout in groups:
        lines += ["", f"#### {mode}, {'NCHW' if layout == 'nchw' else layout}", "",
                  "| site | N | fused us | eager us | compile us | fused/compile | fused/floor "
                  "| model us | model error |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            if (r["mode"], r["layout"]) == (mode, layout):
                lines.append(
                    f"| {r['site']} | {r['n']} | {_cell(r['fused_us'])} | {_cell(r['eager_us'])} "
                    f"| {_cell(r['compile_us'])} | {_cell(r['fused_per_compile'], '.2f')} "
                    f"| {_cell(r['fused_per_floor'], '.2f')} | {_cell(r['model_us'])} "
                    f"| {r['model_error_pct']:+.0f}% |")
    if not rows:
        lines += ["", "(no bench rows)"]
    return "\n".join(lines) + "\n"


def summary_lines(summary: dict) -> list[str]:
    """The verdict in a few lines for the terminal."""
    t = summary["tests"] or {}
    lines = [f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
             f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped, "
             f"{t.get('not_run', 0)} not run"]
    lines += [f"  FAILED {node}" for node in summary["failed_tests"]]
    lines.append(f"bench: {summary['bench_cases']} cases, {summary['bench_cases_not_run']} left "
                 f"out for time")
    if summary["fused_slower_than_compile"]:
        lines.append("fused slower than torch.compile at: "
                     + "; ".join(summary["fused_slower_than_compile"]))
    elif summary["fused_at_least_compile_speed"]:
        lines.append("fused at least as fast as torch.compile in every measured case")
    if summary["cases_without_compile"]:
        lines.append("torch.compile did not run at: " + "; ".join(summary["cases_without_compile"]))
    before, after, fitted = (summary["model_error_before"], summary["model_error_after"],
                             summary["model_fitted"])
    if before and after and fitted:
        lines.append(f"model |error| median / worst: {before['median_abs_pct']}% / "
                     f"{before['worst_abs_pct']}%, fitted {after['median_abs_pct']}% / "
                     f"{after['worst_abs_pct']}% (gap {fitted['kernel_gap_seconds'] * 1e6:.2f} us, "
                     f"HBM {fitted['hbm_bytes_per_second'] / 1e12:.2f} TB/s); torch.compile's "
                     f"model: {summary['compile_model_error']['median_abs_pct']}% / "
                     f"{summary['compile_model_error']['worst_abs_pct']}%")
    lines += [f"error: {e}" for e in summary["stage_errors"]]
    lines.append("PASS" if summary["passed"] else "FAIL")
    return lines


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true",
                        help="about 3 minutes: fewer tests (every kernel and plan option "
                             "still), NCHW only, 3 rounds")
    parser.add_argument("--out", default="gpu-check", metavar="DIR",
                        help="where gpu-check.json, gpu-check.md and the pytest logs go "
                             "(default gpu-check/)")


def _stage(report: dict, name: str, work: Callable[[], object]) -> object:
    """Run a stage; a crash becomes a stage error in the report, not an exit."""
    start = time.monotonic()
    try:
        return work()
    except Exception as e:
        report["stage_errors"].append(f"{name} crashed: {type(e).__name__}: {e}")
        report.setdefault("tracebacks", {})[name] = traceback.format_exc()
        return None
    finally:
        report["stage_seconds"][name] = round(time.monotonic() - start, 1)


def run(args: argparse.Namespace) -> int:
    """The three stages and the report; exit status as in the module docstring."""
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(INTERPRETER_ON, file=sys.stderr)
        return 2
    import triton

    started = time.monotonic()
    settings = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    spec = gpu_plan.device_spec(device)
    report: dict = dict(
        environment=dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                         triton=triton.__version__, cuda=torch.version.cuda),
        quick=args.quick, budget_seconds=dict(total=settings.total_seconds,
                                              tests=settings.test_seconds),
        stage_seconds={}, stage_errors=[])
    print(f"gpu-check on {report['environment']['device']} ({'quick' if args.quick else 'full'}, "
          f"about {settings.total_seconds / 60:.0f} min)", flush=True)
    cores = os.cpu_count() or 1
    shards = min(MAX_SHARDS, max(1, cores - 2))
    warmers = start_cache_warmers(args.quick, min(MAX_WARMERS, max(0, cores - 2 - shards)))
    try:
        def tests() -> dict:
            if not (PACKAGE_ROOT / "tests" / "helpers.py").exists():
                raise FileNotFoundError(f"no test suite at {PACKAGE_ROOT / 'tests'}: run from "
                                        f"a source checkout")
            return run_tests(PACKAGE_ROOT, settings.runs, settings.test_seconds, out, shards,
                             log=_log)

        report["tests"] = _stage(report, "tests", tests)
        _stop(warmers)  # nothing else on the GPU while it is timed
        report["stage_errors"] += (report["tests"] or {}).get("problems", [])
        budget = Budget(max(settings.min_bench_seconds, settings.total_seconds
                            - (time.monotonic() - started) - settings.reserve_seconds))
        report["budget_seconds"]["bench"] = round(budget.seconds, 1)
        report["bench"] = _stage(report, "bench", lambda: run_bench(
            bench_cases(settings), settings.rounds, budget, device, log=_log))
        report["stage_errors"] += (report["bench"] or {}).get("errors", [])
        bench_rows = (report["bench"] or {}).get("rows", [])
        report["model"] = _stage(report, "model", lambda: model_report(bench_rows, spec))
    finally:
        _stop(warmers)
        report["stage_seconds"]["total"] = round(time.monotonic() - started, 1)
        report["summary"] = summarize(report)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
        table = format_markdown(report)
        (out / "gpu-check.md").write_text(table)
    print("\n" + table)
    print("\n".join(summary_lines(report["summary"])))
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return report["summary"]["exit_status"]


def _log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-kernels gpu-check")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
