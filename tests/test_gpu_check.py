"""``sae-kernels gpu-check`` without a GPU: the refusal, and its pure parts (test-run
bookkeeping, the bench budget, the model rows and the fit of its constants, the report) on
synthetic measurements."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sae_kernels import gpu_plan
from sae_kernels.gpu_plan import H100
from sae_kernels.sites import resnet50_sites
from sae_kernels.tools import bench, gpu_check
from sae_kernels.tools.gpu_check import (
    FULL,
    QUICK,
    Budget,
    PytestRun,
    bench_cases,
    bench_problem,
    format_markdown,
    fused_terms,
    model_report,
    parse_collected,
    parse_outcomes,
    run_bench,
    run_tests,
    split_shards,
    summarize,
    tally,
)
from sae_kernels.tools.timing import Stats

#: The constants the synthetic measurements are generated with.
TRUE_GAP = 5.5e-6
TRUE_BANDWIDTH = 2.4e12


def _row(site, n, mode, layout="nchw", **medians) -> dict:
    """A bench row as ``bench.Result.to_json`` writes it, with these medians (us)."""
    return dict(site=site.name, channels=site.channels, size=site.size,
                reduction=site.reduction, cardinality=site.cardinality, n=n, layout=layout,
                mode=mode, dtype="bfloat16", fused_backend="triton",
                latency_us={v: dict(median=t, p20=t, p80=t) for v, t in medians.items()},
                launches={"fused": 4})


def _synthetic_rows(spec=H100, gap=TRUE_GAP, bandwidth=TRUE_BANDWIDTH) -> list[dict]:
    """Every site, N and mode, NCHW: fused times from the model itself with other constants
    (the plan still the one ``spec`` picks), torch.compile 20% slower, the floor at half."""
    rows = []
    for site in resnet50_sites():
        for n in (1, 8, 32, 128):
            for mode in bench.MODES:
                row = _row(site, n, mode)
                terms = fused_terms(bench_problem(row), spec, mode == "forward+backward")
                fused = 1e6 * terms.seconds(gap, bandwidth)
                rows.append(_row(site, n, mode, fused=fused, eager=3 * fused, compile=1.2 * fused,
                                 floor=fused / 2))
    return rows


def _report(rows, tests_ok=True, stage_errors=()) -> dict:
    selection = dict(label="gpu_plan", collected=3, passed=3 - (not tests_ok),
                     failed=int(not tests_ok), errors=0, skipped=0, xfailed=0, not_run=0,
                     failures=[] if tests_ok else ["tests/test_gpu_plan.py::test_x[a]"])
    tests = dict(selections=[selection], shards=[dict(returncode=0 if tests_ok else 1,
                                                      timed_out=False)],
                 totals={k: selection[k] for k in ("collected", "passed", "failed", "errors",
                                                   "skipped", "xfailed", "not_run")},
                 problems=[])
    tests["ok"] = gpu_check.tests_ok(tests)
    return dict(environment=dict(device="NVIDIA H100 80GB HBM3", torch="2.14.1", triton="3.8.0",
                                 cuda="13.0"),
                tests=tests, bench=dict(dtype="bfloat16", rounds=5, rows=rows, not_run=[]),
                model=model_report(rows, H100), stage_errors=list(stage_errors))


# ----------------------------------------------------------------------------------------
# Without a GPU
# ----------------------------------------------------------------------------------------


def test_without_cuda_it_says_so_writes_nothing_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main([]) == 2
    assert gpu_check.main(["--quick", "--out", str(tmp_path / "elsewhere")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == [gpu_check.NO_CUDA] * 2
    assert "no CUDA device" in lines[0] and "nothing was checked" in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "sae_kernels.tools.gpu_check"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == gpu_check.NO_CUDA
    assert list(tmp_path.iterdir()) == []


def test_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "2 when torch sees no CUDA device" in text
    assert "--quick" in text and "--out DIR" in text


# ----------------------------------------------------------------------------------------
# The model and its fit
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("n", [1, 32, 128])
def test_terms_are_the_models_time(n, backward):
    """The fit's split of the model (gap + max(bytes / bandwidth, tail) per launch) gives
    the device time of the dispatcher's launches, with the datasheet constants and with
    others; ``model_seconds`` takes, per pass, the longer of that and the host's
    launches."""
    site = resnet50_sites()[1]
    problem = bench_problem(_row(site, n, "forward"))
    assert not (problem.has_identity or problem.prologue or problem.relu_out)
    assert problem.flat and problem.k == site.stacked_width
    terms = fused_terms(problem, H100, backward)
    forward = gpu_plan.forward_launches(problem, gpu_plan.plan_launch(problem, H100), H100)
    passes = [forward]
    if backward:
        passes.append(gpu_plan.backward_launches(
            problem, gpu_plan.plan_launch(problem, H100, "split", backward=True), H100))
    other = dataclasses.replace(H100, kernel_gap_seconds=TRUE_GAP,
                                hbm_bytes_per_second=TRUE_BANDWIDTH)
    for spec in (H100, other):
        assert terms.seconds(spec.kernel_gap_seconds, spec.hbm_bytes_per_second) == (
            pytest.approx(sum(gpu_plan.device_total(launches, spec) for launches in passes),
                          rel=1e-12))
    assert sum(gpu_plan.call_seconds(launches, H100) for launches in passes) == pytest.approx(
        gpu_plan.model_seconds(problem, gpu_plan.plan_launch(problem, H100), H100, backward),
        rel=1e-12)
    assert gpu_plan.call_seconds(forward, H100) == max(
        len(forward) * H100.host_launch_seconds,
        sum(gpu_plan.device_seconds(launch, H100) for launch in forward))


def test_the_fit_recovers_the_constants_of_synthetic_measurements():
    rows = _synthetic_rows()
    model = model_report(rows, H100)
    fitted = model["fitted"]
    assert fitted["kernel_gap_seconds"] == pytest.approx(TRUE_GAP, rel=1e-3)
    assert fitted["hbm_bytes_per_second"] == pytest.approx(TRUE_BANDWIDTH, rel=1e-3)
    assert model["error_after"]["worst_abs_pct"] < 0.1
    assert model["error_before"]["median_abs_pct"] > 5
    assert model["error_before"]["cases"] == model["error_after"]["cases"] == len(rows)


def test_the_fit_is_deterministic_and_starts_anywhere_near():
    rows = _synthetic_rows()
    first = model_report(rows, H100)["fitted"]
    assert model_report(rows, H100)["fitted"] == first
    far = dataclasses.replace(H100, kernel_gap_seconds=0.3e-6, hbm_bytes_per_second=5e12)
    other = _synthetic_rows(spec=far)
    fitted = model_report(other, far)["fitted"]
    assert fitted["kernel_gap_seconds"] == pytest.approx(TRUE_GAP, rel=1e-3)
    assert fitted["hbm_bytes_per_second"] == pytest.approx(TRUE_BANDWIDTH, rel=1e-3)


def test_model_rows_carry_the_measurements_the_model_and_its_errors():
    site = resnet50_sites()[0]
    problem = bench_problem(_row(site, 8, "forward"))
    modelled = 1e6 * fused_terms(problem, H100, False).seconds(H100.kernel_gap_seconds,
                                                              H100.hbm_bytes_per_second)
    rows = [_row(site, 8, "forward", fused=modelled / 1.25, eager=100.0, compile=80.0,
                 floor=40.0),
            _row(site, 8, "forward", layout="channels_last")]  # fused did not run: no row
    (row,) = model_report(rows, H100)["rows"]
    assert row["model_error_pct"] == pytest.approx(25.0, abs=0.1)
    assert row["fused_per_compile"] == pytest.approx(modelled / 1.25 / 80, rel=1e-2)
    assert row["fused_per_floor"] == pytest.approx(modelled / 1.25 / 40, rel=1e-2)
    compiled = 1e6 * gpu_plan.device_total(gpu_plan.compile_launches(problem, H100), H100)
    assert row["compile_model_us"] == pytest.approx(compiled, abs=0.01)
    assert row["compile_model_error_pct"] == pytest.approx(100 * (compiled - 80) / 80, abs=0.1)
    assert row["launches_modelled"] == len(fused_terms(problem, H100, False).hbm_bytes)
    assert row["plan"] in ("single", "split")


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def test_the_markdown_table_has_a_line_per_site_and_batch():
    rows = _synthetic_rows()
    report = _report(rows)
    text = format_markdown(report)
    assert "NVIDIA H100 80GB HBM3" in text and "bfloat16" in text
    assert "#### forward, NCHW" in text and "#### forward+backward, NCHW" in text
    header = ("| site | N | fused us | eager us | compile us | fused/compile | fused/floor "
              "| model us | model error |")
    assert text.count(header) == 2
    table_lines = [line for line in text.splitlines() if line.startswith("| SE")]
    assert len(table_lines) == len(rows)
    first = report["model"]["rows"][0]
    cells = [c.strip() for c in table_lines[0].strip("|").split("|")]
    assert cells[:2] == [first["site"], str(first["n"])]
    assert cells[2] == f"{first['fused_us']:.1f}" and cells[5] == "0.83" and cells[6] == "2.00"
    assert cells[8] == f"{first['model_error_pct']:+.0f}%"
    assert "fitted" in text and "TB/s" in text


def test_the_report_is_json_and_passes_only_when_every_test_did():
    rows = _synthetic_rows()
    report = _report(rows)
    summary = summarize(report)
    assert summary["passed"] and summary["exit_status"] == 0
    assert summary["fused_at_least_compile_speed"] and not summary["fused_slower_than_compile"]
    assert summary["bench_cases"] == len(rows)
    assert summary["model_error_after"]["worst_abs_pct"] < 0.1
    lines = gpu_check.summary_lines(summary)
    assert lines[0] == "tests: 3 passed, 0 failed, 0 errors, 0 skipped, 0 not run"
    assert any("5.50 us" in line and "2.40 TB/s" in line for line in lines)
    assert lines[-1] == "PASS"
    report["summary"] = summary
    loaded = json.loads(json.dumps(report))
    assert loaded["model"]["fitted"]["kernel_gap_seconds"] == pytest.approx(TRUE_GAP, rel=1e-3)
    assert len(loaded["bench"]["rows"]) == len(loaded["model"]["rows"]) == len(rows)
    row = loaded["model"]["rows"][0]
    for key in ("fused_us", "eager_us", "compile_us", "floor_us", "fused_per_compile",
                "fused_per_floor", "model_us", "model_error_pct", "fit_us", "fit_error_pct",
                "compile_model_us", "compile_model_error_pct"):
        assert row[key] is not None, key

    failed = summarize(_report(rows, tests_ok=False))
    assert not failed["passed"] and failed["exit_status"] == 1
    assert failed["failed_tests"] == ["tests/test_gpu_plan.py::test_x[a]"]
    crashed = summarize(_report(rows, stage_errors=["bench crashed: RuntimeError: x"]))
    assert crashed["exit_status"] == 1 and crashed["stage_errors"]
    slow = [dict(r, latency_us=dict(r["latency_us"], compile=dict(median=1.0, p20=1, p80=1)))
            if r["n"] == 8 else r for r in rows]
    slower = summarize(_report(slow))
    assert slower["exit_status"] == 0  # a target missed is reported, not a failure
    assert len(slower["fused_slower_than_compile"]) == len(rows) // 4
    assert not slower["fused_at_least_compile_speed"]
    assert "FAIL" not in gpu_check.summary_lines(slower)[-1]
    no_compile = [dict(r, latency_us={k: v for k, v in r["latency_us"].items() if k != "compile"})
                  if r["n"] == 1 else r for r in rows]
    missing = summarize(_report(no_compile))
    assert len(missing["cases_without_compile"]) == len(rows) // 4
    assert not missing["fused_at_least_compile_speed"] and missing["exit_status"] == 0


# ----------------------------------------------------------------------------------------
# The tests stage and the bench stage
# ----------------------------------------------------------------------------------------


def test_pytest_output_parsing_and_sharding():
    collected = textwrap.dedent("""\
        tests/test_a.py::test_one[x y]
        tests/test_a.py::test_two
        tests/test_b.py::test_three

        ==== warnings summary ====
        tests/test_a.py::test_two
          /x.py:1: UserWarning: w
        3 tests collected in 0.1s
        """)
    nodes = parse_collected(collected)
    assert nodes == ["tests/test_a.py::test_one[x y]", "tests/test_a.py::test_two",
                     "tests/test_b.py::test_three"]
    output = textwrap.dedent("""\
        tests/test_a.py::test_one[x y] PASSED                  [ 33%]
        tests/test_a.py::test_two SKIPPED (no gpu)             [ 66%]
        tests/test_b.py::test_three PASSED                     [100%]
        tests/test_b.py::test_three ERROR                      [100%]
        FAILED tests/test_a.py::test_one[x y] - AssertionError
        """)
    outcomes = parse_outcomes(output)
    assert outcomes == {"tests/test_a.py::test_one[x y]": "PASSED",
                        "tests/test_a.py::test_two": "SKIPPED",
                        "tests/test_b.py::test_three": "ERROR"}
    (row,) = tally({"a": nodes + ["tests/test_b.py::test_four"]}, outcomes)
    assert (row["collected"], row["passed"], row["skipped"], row["errors"], row["not_run"]) == (
        4, 1, 1, 1, 1)
    assert row["failures"] == ["tests/test_b.py::test_three"]
    chunks = split_shards([str(i) for i in range(10)], 4)
    assert [len(c) for c in chunks] == [3, 3, 2, 2]
    assert sum(chunks, []) == [str(i) for i in range(10)]
    assert split_shards(["a"], 8) == [["a"]] and split_shards([], 3) == []


def test_run_tests_counts_failures_and_cuts_a_run_at_the_deadline(tmp_path):
    suite = tmp_path / "tests"
    suite.mkdir()
    (suite / "test_quick.py").write_text(textwrap.dedent("""\
        import pytest

        @pytest.mark.parametrize("v", [1, 2, 3])
        def test_values(v):
            assert v != 2

        def test_skipped():
            pytest.skip("not here")
        """))
    (suite / "test_slow.py").write_text(textwrap.dedent("""\
        import time

        def test_fast():
            pass

        def test_hangs():
            time.sleep(600)
        """))
    runs = (PytestRun("quick", "tests/test_quick.py", "values or skipped"),
            PytestRun("slow", "tests/test_slow.py"))
    out = tmp_path / "out"
    out.mkdir()
    result = run_tests(tmp_path, runs, seconds=20, out=out, shards=2, log=lambda line: None)
    quick, slow = result["selections"]
    assert (quick["collected"], quick["passed"], quick["failed"], quick["skipped"]) == (4, 2, 1, 1)
    assert quick["failures"] == ["tests/test_quick.py::test_values[2]"]
    assert (slow["collected"], slow["passed"], slow["not_run"]) == (2, 1, 1)
    assert [s["timed_out"] for s in result["shards"]] == [False, True]
    assert result["shards"][0]["returncode"] == 1
    assert any("timed out" in p for p in result["problems"])
    assert not result["ok"]
    assert result["totals"]["collected"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["pytest-0.log", "pytest-1.log"]


def test_bench_cases_come_most_wanted_first():
    quick, full = bench_cases(QUICK), bench_cases(FULL)
    assert len(quick) == 8 * 4 * 2 and len(full) == 2 * len(quick)
    assert {c.layout for c in quick} == {"nchw"}
    assert [c.mode for c in quick[:32]] == ["forward"] * 32
    assert full[:len(quick)] == quick
    assert {c.layout for c in full[len(quick):]} == {"channels_last"}
    assert {c.n for c in quick} == {1, 8, 32, 128}


def test_run_bench_stops_starting_cases_when_the_budget_is_spent(monkeypatch):
    """Fake cases of 10 s each on a fake clock: a case starts only while the longest of its
    mode so far still fits; one that crashes is reported and the others go on."""
    now = [0.0]
    calls = []

    def fake_run_case(case, dtype, device, variants, fused_backend, rounds):
        now[0] += 10
        calls.append((case.n, case.mode, rounds))
        if case.n == 8 and case.mode == "forward":
            raise RuntimeError("kernel failed\nmore")
        times = {v: Stats(20.0, 19.0, 21.0) for v in variants}
        return bench.Result(case, dtype, "triton", times, {v: 3 for v in variants},
                            case.cost(dtype), {}, {})

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    site = resnet50_sites()[0]
    cases = bench.cases([site], [1, 8, 32], ["nchw"], list(bench.MODES))
    budget = Budget(50, clock=lambda: now[0])
    result = run_bench(cases, 2, budget, torch.device("cpu"), log=lambda line: None)
    # warm-up (10 s), N=1 (20 s: 10 s, the longest forward), N=8 crashes (30 s), N=32 (40 s);
    # forward+backward N=1 (50 s, the first: no estimate yet), N=8 would end at 60 s
    assert calls == [(1, "forward", 1), (1, "forward", 2), (8, "forward", 2),
                     (32, "forward", 2), (1, "forward+backward", 2)]
    assert [(r["n"], r["mode"]) for r in result["rows"]] == [
        (1, "forward"), (32, "forward"), (1, "forward+backward")]
    assert [r["seconds"] for r in result["rows"]] == [10, 10, 10]
    assert result["errors"] == [
        f"bench {site.name} N=8 nchw forward: RuntimeError: kernel failed"]
    assert result["not_run"] == [f"{site.name} N=8 nchw forward+backward",
                                 f"{site.name} N=32 nchw forward+backward"]
    assert result["block"] == gpu_check.BLOCK and result["variants"] == list(
        gpu_check.BENCH_VARIANTS)


@pytest.mark.parametrize("bench_crashes", [False, True])
def test_the_command_writes_its_report_also_after_a_crash(monkeypatch, tmp_path, capsys,
                                                          bench_crashes):
    """The stages stubbed (no GPU here): the JSON and the table are written, the table is
    printed, and a crashed stage makes the exit status 1."""
    rows = _synthetic_rows()
    tests = _report(rows)["tests"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(gpu_plan, "device_spec", lambda device: H100)
    monkeypatch.setattr(gpu_check, "start_cache_warmers", lambda quick, workers: [])
    monkeypatch.setattr(gpu_check, "run_tests", lambda *args, **kwargs: tests)
    budgets = []

    def fake_bench(cases, rounds, budget, device, log):
        budgets.append(budget.seconds)
        if bench_crashes:
            raise RuntimeError("out of memory")
        return dict(dtype="bfloat16", rounds=rounds, rows=rows, not_run=[], errors=[])

    monkeypatch.setattr(gpu_check, "run_bench", fake_bench)
    out = tmp_path / "report"
    status = gpu_check.main(["--quick", "--out", str(out)])
    report = json.loads((out / "gpu-check.json").read_text())
    table = (out / "gpu-check.md").read_text()
    printed = capsys.readouterr().out
    assert table in printed
    assert QUICK.min_bench_seconds <= budgets[0] <= QUICK.total_seconds
    assert report["environment"]["device"] == "Fake GPU"
    assert set(report["stage_seconds"]) == {"tests", "bench", "model", "total"}
    assert report["summary"]["tests"]["passed"] == 3
    if bench_crashes:
        assert status == 1 and printed.rstrip().splitlines()[-2] == "FAIL"
        assert report["stage_errors"] == ["bench crashed: RuntimeError: out of memory"]
        assert "(no bench rows)" in table
    else:
        assert status == 0 and printed.rstrip().splitlines()[-2] == "PASS"
        assert len(report["model"]["rows"]) == len(rows)
        assert table.count("| SE") == len(rows)
