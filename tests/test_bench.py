"""``sae-kernels bench`` on a tiny quick run, and the pieces it is built from: the cost
model, the launch counter and the statistics."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sae_kernels import FusedSaE, SaE
from sae_kernels.__main__ import main
from sae_kernels.cost import fc_flops, sae_cost
from sae_kernels.kernels import cpu as cpu_kernels
from sae_kernels.tools import timing
from sae_kernels.tools.bench import (
    VARIANTS,
    Case,
    VariantUnavailable,
    case_operands,
    custom_site,
    variant_call,
)
from sae_kernels.tools.launches import count_launches, profiled
from sae_kernels.tools.timing import Stats

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def variants_that_run() -> set[str]:
    """The fair floor needs the C++ CPU kernels."""
    return set(VARIANTS) if cpu_kernels.available() else set(VARIANTS) - {"fair_floor"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick bench over a 19-channel site (reduction 4, 2 branches), both modes."""
    out = tmp_path_factory.mktemp("bench")
    paths = {kind: out / f"bench.{kind}" for kind in ("json", "csv", "png")}
    code = main(["bench", "--shapes", "19x5x5", "--reduction", "4", "--cardinality", "2",
                 "-n", "3", "--modes", "forward", "forward+backward", "--rounds", "3",
                 "--json", str(paths["json"]), "--csv", str(paths["csv"]),
                 "--plot", str(paths["png"])])
    return code, paths


def test_quick_run_writes_json_csv_and_png(quick_run):
    code, paths = quick_run
    assert code == 0
    data = json.loads(paths["json"].read_text())
    assert [r["mode"] for r in data["results"]] == ["forward", "forward+backward"]
    assert set(data["summary"]) == {"forward", "forward+backward"}
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    assert float(rows[0]["fused_median_us"]) == data["results"][0]["latency_us"]["fused"]["median"]
    if cpu_kernels.available():
        assert float(rows[0]["fair_floor_ratio"]) == data["results"][0]["fair_floor_ratio"]
        summary = data["summary"]["forward"]
        assert summary["max fused/fair_floor"] == data["results"][0]["fair_floor_ratio"]
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE


def test_json_fields_are_consistent(quick_run):
    _, paths = quick_run
    for r in json.loads(paths["json"].read_text())["results"]:
        latency = r["latency_us"]
        assert set(latency) == variants_that_run()
        for stats in latency.values():
            assert 0 < stats["p20"] <= stats["median"] <= stats["p80"]
        median = {v: stats["median"] for v, stats in latency.items()}
        assert r["speedup_over_eager"] == pytest.approx(median["eager"] / median["fused"])
        assert r["speedup_over_compile"] == pytest.approx(median["compile"] / median["fused"])
        assert r["floor_ratio"] == pytest.approx(median["fused"] / median["floor"])
        if "fair_floor" in median:
            assert r["fair_floor_ratio"] == pytest.approx(median["fused"] / median["fair_floor"])
        for v in median:
            assert r["gbps"][v] == pytest.approx(r["bytes"] / (median[v] * 1e3))
        backward = r["mode"] == "forward+backward"
        cost = sae_cost(3, 19, 25, 2 * (19 // 4), 4, backward=backward)
        assert r["bytes"] == cost.compulsory_bytes
        assert r["flops"]["matmul"] == cost.matmul_flops
        assert r["flops"]["total"] == cost.flops
        # FlopCounterMode, run on the eager and fused variants, agrees with the model
        assert r["flops"]["counted_matmul"] == {"eager": cost.matmul_flops,
                                                "fused": cost.matmul_flops}
        assert set(r["errors"]) == set(VARIANTS) - variants_that_run()
        assert r["fused_backend"] == ("cpu" if cpu_kernels.available() else "reference")


def test_launch_counts_in_json(quick_run):
    _, paths = quick_run
    forward, training = json.loads(paths["json"].read_text())["results"]
    if cpu_kernels.available():
        assert forward["launches"]["fused"] == 1  # the one C++ op
        assert training["launches"]["fused"] == 2  # its forward and its backward
    # mean, 2 x (linear, relu), cat, linear, sigmoid, mul
    assert forward["launches"]["eager"] == 9
    assert 1 <= forward["launches"]["compile"] < forward["launches"]["eager"]
    assert training["launches"]["eager"] > forward["launches"]["eager"]


def test_a_subset_of_variants(tmp_path):
    path = tmp_path / "subset.json"
    assert main(["bench", "--shapes", "8x3x3", "--reduction", "2", "-n", "1", "--rounds", "1",
                 "--backends", "eager", "fused", "--json", str(path)]) == 0
    (result,) = json.loads(path.read_text())["results"]
    assert set(result["latency_us"]) == {"eager", "fused"}
    assert result["speedup_over_eager"] > 0
    assert result["speedup_over_compile"] is None and result["floor_ratio"] is None
    assert result["fair_floor_ratio"] is None and result["errors"] == {}


def test_fair_floor_without_the_cpu_kernels_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    path = tmp_path / "no_kernels.json"
    assert main(["bench", "--shapes", "8x3x3", "--reduction", "2", "-n", "1", "--rounds", "1",
                 "--variants", "floor", "fair_floor", "--json", str(path)]) == 0
    (result,) = json.loads(path.read_text())["results"]
    assert set(result["latency_us"]) == {"floor"} and result["fair_floor_ratio"] is None
    assert result["errors"] == {"fair_floor": "VariantUnavailable: needs the C++ CPU kernels, "
                                              "which are not loaded"}
    assert "fair_floor did not run: VariantUnavailable" in capsys.readouterr().out


def test_fair_floor_is_skipped_off_cpu():
    # meta tensors stand in for CUDA ones: the fair floor refuses any device but the CPU
    case = Case(custom_site("8x3x3", reduction=2, cardinality=1), 1, "nchw", "forward")
    reference, x, grad = case_operands(case, torch.float32, torch.device("meta"))
    with pytest.raises(VariantUnavailable, match="none on meta"):
        variant_call("fair_floor", reference, x, grad, fused_backend="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fair_floor_on_cuda_is_skipped(tmp_path):
    path = tmp_path / "cuda.json"
    assert main(["bench", "--device", "cuda", "--shapes", "8x3x3", "--reduction", "2", "-n", "1",
                 "--rounds", "1", "--variants", "fused", "fair_floor", "--json", str(path)]) == 0
    (result,) = json.loads(path.read_text())["results"]
    assert set(result["latency_us"]) == {"fused"} and set(result["errors"]) == {"fair_floor"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_shape_is_a_clear_error(capsys):
    assert main(["bench", "--shapes", "19x5x6"]) == 2
    assert "shape '19x5x6'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="C / reduction"):
        custom_site("3x5x5", reduction=16, cardinality=1)


def test_cost_model_by_hand():
    # N=2, C=8, HW=9, K=4 (2 branches of 2), fp32
    forward = sae_cost(2, 8, 9, 4, 4)
    assert forward.matmul_flops == 2 * (2 * 2 * 4 * 8)
    assert forward.elementwise_flops == 2 * 144 + 2 * (4 + 8)
    assert forward.compulsory_bytes == 4 * (2 * 144 + 2 * 4 * 8 + 4 + 8)
    both = sae_cost(2, 8, 9, 4, 4, backward=True)
    assert both.matmul_flops == 3 * forward.matmul_flops
    assert both.compulsory_bytes == 4 * (5 * 144 + 3 * (2 * 4 * 8 + 4 + 8))
    single = sae_cost(2, 8, 9, 8, 2, single_fc=True)
    assert single.matmul_flops == fc_flops(2, 8, 8, single_fc=True) == 2 * 2 * 8 * 8
    assert single.compulsory_bytes == 2 * (2 * 144 + 8 * 8 + 8)


@pytest.mark.parametrize("floor", ["floor", "fair_floor"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_floor_does_the_operator_matmuls(mode, floor):
    if floor not in variants_that_run():
        pytest.skip("no C++ CPU kernels")
    case = Case(custom_site("12x3x3", reduction=3, cardinality=2), 2, "nchw", mode)
    reference, x, grad = case_operands(case, torch.float32, CPU)
    with FlopCounterMode(display=False) as counter:
        variant_call(floor, reference, x, grad, fused_backend="auto")()
    assert counter.get_total_flops() == case.cost(torch.float32).matmul_flops


def test_launch_counter():
    ref = SaE(16, reduction=4, cardinality=4)
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        # mean, 4 x (linear, relu), cat, linear, sigmoid, mul; the unsqueezes are views
        assert count_launches(lambda: ref(x), CPU) == 13
        assert count_launches(lambda: x.view(2, -1).t().unsqueeze(0), CPU) == 0
        if cpu_kernels.available():
            fused = FusedSaE.from_module(ref, backend="cpu")
            assert count_launches(lambda: fused(x), CPU) == 1


def test_profiled_keeps_kinetos_start_and_stop_lines_off_stderr(capfd):
    """Kineto writes ``USDT: ... profiler_start`` / ``profiler_stop`` to file descriptor 2
    (with this torch); what the profiled code writes there still shows, and the events
    are recorded."""
    with profiled(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        os.write(2, b"from the profiled code\n")
        torch.ones(3).add_(1)
    err = capfd.readouterr().err
    assert err == "from the profiled code\n"
    assert any(e.name == "aten::add_" for e in prof.events())


def test_cold_timing_runs_every_call_after_a_pass_over_memory(monkeypatch):
    """measure_interleaved_cold: each call timed alone, a flush of memory before it."""
    monkeypatch.setattr(timing, "COLD_FLUSH_FLOATS", 1024)
    log = []
    real_add = torch.Tensor.add_

    def add_(self, *args):  # the flush pass
        log.append("flush")
        return real_add(self, *args)

    monkeypatch.setattr(torch.Tensor, "add_", add_)
    times = timing.measure_interleaved_cold({"a": lambda: log.append("a"),
                                             "b": lambda: log.append("b")}, rounds=2,
                                            calls_per_round=3)
    timed = log[2 * timing.WARMUP_CALLS:]  # after the warm-up calls
    assert timed == ["flush", "a", "flush", "a", "flush", "a", "flush", "b", "flush", "b",
                     "flush", "b"] + ["flush", "b"] * 3 + ["flush", "a"] * 3
    assert set(times) == {"a", "b"} and all(0 < t.median for t in times.values())


def test_stats_percentiles():
    stats = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.p20, stats.p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C++ CPU kernels")
def test_call_cost_script_prints_every_way_of_calling_the_op():
    """benchmarks/call_cost.py (the README's fixed-cost table), one round on 3 channels."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "call_cost.py"
    result = subprocess.run([sys.executable, str(script), "--channels", "3", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and "µs" not in line and "---" not in line]
    assert rows == ["x.clone()", "op, typed entry", "op, torch.ops", "sae_kernels.sae",
                    "FusedSE module", "FusedSaE module (4 branches)"]


@pytest.mark.parametrize("script", ["compiled_se_blocks", "compiled_se_sites", "excitation_cost",
                                    "prologue_vs_conv_fold", "output_pool"])
def test_benchmark_scripts_import_and_describe_themselves(script):
    """Each script's imports hold (what it borrows from the package among them): --help."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")


def _benchmark_module(name: str, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_compiled_se_sites_finds_each_site_in_a_graphs_ops(monkeypatch):
    """benchmarks/compiled_se_sites.py reads SE sites out of a compiled graph's ops: the
    original's FC convolutions and their activation; the C++ excitation, with a shortcut's
    convolution between it and the rescale that is not the SE's work; FCs as addmm with an
    op between them, and a rescale that holds the network's head pool; a reduction that a
    convolution on a map follows, and one that no kernel closes, are no sites."""
    sites = _benchmark_module("compiled_se_sites", monkeypatch)

    def op(name, *shapes):
        return SimpleNamespace(name=name, input_shapes=list(shapes))

    ops = [op("graph_0_cpp_fused_batch_norm_mean_silu_1"),           # 0: pool
           op("aten::convolution", [1, 32, 1, 1], [8, 32, 1, 1]),    # FC1
           op("graph_0_cpp_fused_silu_2"),                            # its activation
           op("aten::convolution", [1, 8, 1, 1], [32, 8, 1, 1]),     # FC2
           op("graph_0_cpp_fused_mul_sigmoid_3"),                     # 4: rescale
           op("aten::convolution", [1, 32, 14, 14], [64, 32, 1, 1]),
           op("graph_0_cpp_fused_add_mean_mul_rsqrt_6"),              # 6: pool
           op("sae_kernels::cpu_excite", [1, 64], [16, 64]),
           op("aten::convolution", [1, 32, 14, 14], [64, 32, 1, 1]),  # the shortcut's
           op("graph_0_cpp_fused_add_mul_relu_7"),                    # 9: rescale
           op("graph_0_cpp_fused_mean_8"),                            # not a pool:
           op("aten::convolution", [1, 64, 14, 14], [64, 64, 3, 3]),  # a map follows
           op("graph_0_cpp_fused_batch_norm_mean_9"),                 # 12: pool
           op("aten::addmm", [16], [1, 64], [64, 16]),
           op("aten::empty", []),
           op("aten::addmm", [64], [1, 16], [16, 64]),
           op("graph_0_cpp_fused_add_mean_mul_relu_sigmoid_10"),      # 16: rescale, head pool
           op("aten::addmm", [1000], [1, 64], [64, 1000])]            # the classifier
    assert sites.find_sites(ops) == [sites.SiteSpan(0, (1, 2, 3), 4),
                                     sites.SiteSpan(6, (7,), 9),
                                     sites.SiteSpan(12, (13, 14, 15), 16)]
