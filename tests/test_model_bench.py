"""``sae-kernels bench --models``: whole networks end to end, on a tiny SE-ResNet-18 (32 x 32
input) without torch.compile, which would take minutes here."""

import contextlib
import io
import json
import sys

import pytest
import torch
from torch import nn

from sae_kernels import SE, convert, senetv2_resnet
from sae_kernels.__main__ import main
from sae_kernels.tools import model_bench
from sae_kernels.tools.model_bench import (
    SPEEDUPS,
    VARIANTS,
    FreeSE,
    ModelResult,
    OnnxCheck,
    build,
    format_notes,
    format_row,
    onnxruntime_unavailable,
    randomize_batchnorm,
    table_header,
    without_se,
)
from sae_kernels.tools.timing import Stats

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: One thread: two threads on two shared cores stall whenever another job takes one of them.
TINY = ["--models", "se_resnet18", "--image-size", "32", "--rounds", "1", "--threads", "1"]
HAS_ONNXRUNTIME = onnxruntime_unavailable(CPU) is None


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """``--threads`` sets torch's thread count for the whole process: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(argv: list[str]) -> tuple[int, str]:
    """``main(argv)``'s exit code and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory):
    """Inference at N=1: eager, convert, se-free and (where installed) onnxruntime."""
    folder = tmp_path_factory.mktemp("model_bench")
    paths = {"json": folder / "models.json", "png": folder / "models.png"}
    code, out = run_main(["bench", *TINY, "-n", "1", "--variants", "eager", "convert",
                          "se-free", "onnxruntime", "--json", str(paths["json"]),
                          "--plot", str(paths["png"])])
    return code, out, json.loads(paths["json"].read_text()), paths["png"]


def test_inference_run_writes_json_and_png(inference_run):
    code, out, data, png = inference_run
    assert code == 0
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["threads"] == 1
    assert data["environment"]["image_size"] == 32
    (row,) = data["results"]
    assert (row["model"], row["n"], row["mode"]) == ("se_resnet18", 1, "inference")
    assert row["input_shape"] == [3, 32, 32]
    assert set(row["speedups"]) == set(SPEEDUPS)
    assert row["errors"] == {}
    assert data["models"]["se_resnet18"]["converted_blocks"] == {"inference": 8}
    assert row["converted_blocks"] == 8  # one SE block per residual block
    assert set(data["summary"]) == {"inference"}
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "| model       |   N | mode      | eager ms |" in out
    assert "| se_resnet18 |   1 | inference |" in out
    assert "median over 1 inference rows: convert / eager" in out


def test_speedups_are_the_ratios_of_the_medians(inference_run):
    _, _, data, _ = inference_run
    (row,) = data["results"]
    latency = row["latency_ms"]
    for stats in latency.values():
        assert 0 < stats["p20"] <= stats["median"] <= stats["p80"]
    median = {variant: stats["median"] for variant, stats in latency.items()}
    assert row["speedups"]["convert / eager"] == pytest.approx(median["eager"]
                                                               / median["convert"])
    assert row["speedups"]["se-free / eager"] == pytest.approx(median["eager"]
                                                               / median["se-free"])
    assert row["speedups"]["compile(convert) / compile"] is None  # not timed
    assert row["speedups"]["compile(se-free) / compile"] is None
    assert row["speedups"]["onnxruntime / compile"] is None
    if HAS_ONNXRUNTIME:
        assert row["speedups"]["onnxruntime / eager"] == pytest.approx(
            median["eager"] / median["onnxruntime"])
    # one row: the summary's medians are its own ratios
    assert data["summary"]["inference"] == {"rows": 1, **row["speedups"]}


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="needs onnx and onnxruntime")
def test_onnxruntime_output_is_checked_against_eager(inference_run):
    _, out, data, _ = inference_run
    (row,) = data["results"]
    assert set(row["latency_ms"]) == {"eager", "convert", "se-free", "onnxruntime"}
    check = row["onnxruntime_check"]
    assert check["exporter"] in ("dynamo", "legacy")
    assert 0 <= check["relative_error"] < model_bench.ONNX_TOLERANCE and check["match"]
    assert "se_resnet18 N=1 inference: onnxruntime output vs eager" in out
    assert "matches" in out


def test_training_run(tmp_path):
    """Training at N=2 (BatchNorm needs two values per channel on the 1 x 1 last stage);
    onnxruntime is inference only and is left out of the training rows."""
    path = tmp_path / "training.json"
    code, out = run_main(["bench", *TINY, "-n", "2", "--modes", "training", "--variants",
                          "eager", "convert", "onnxruntime", "--json", str(path)])
    assert code == 0
    (row,) = json.loads(path.read_text())["results"]
    assert row["mode"] == "training" and row["n"] == 2
    assert set(row["latency_ms"]) == {"eager", "convert"}
    assert row["onnxruntime_check"] is None
    assert row["converted_blocks"] == 8
    median = {variant: stats["median"] for variant, stats in row["latency_ms"].items()}
    assert row["speedups"]["convert / eager"] == pytest.approx(median["eager"]
                                                               / median["convert"])
    assert "| se_resnet18 |   2 | training  |" in out


def test_training_variants_have_their_own_weights():
    base = build("se_resnet18", 32).module.train()
    base_parameters = {id(p) for p in base.parameters()}
    for variant in (v for v in VARIANTS if v != "onnxruntime"):
        module, report = model_bench._variant_module(variant, base, training=True)
        assert base_parameters.isdisjoint(id(p) for p in module.parameters()), variant
        assert (report is not None) == ("convert" in variant)
        assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule) == (
            variant.startswith("compile"))
    # in inference they share the model, which they do not change
    module, _ = model_bench._variant_module("eager", base.eval(), training=False)
    assert module is base


def test_the_se_free_variant_keeps_everything_but_the_se_blocks():
    """Every SE block convert finds becomes a FreeSE (x, with the shortcut add and ReLU of
    the package's blocks), nothing else changes, and the original model is left as it was."""
    torch.manual_seed(0)
    model = senetv2_resnet(18, num_classes=10, fused=False, base_width=32).eval()
    _, report = convert(model)
    paths = [c.path for c in report.converted]
    free = without_se(model, paths)
    assert paths and all(isinstance(free.get_submodule(p), FreeSE) for p in paths)
    assert not any(isinstance(m, FreeSE) for m in model.modules())
    kept = {name for name, _ in model.named_modules() if not any(
        name == p or name.startswith(p + ".") for p in paths)}
    assert kept == {name for name, _ in free.named_modules() if name not in paths}
    x, identity = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    assert torch.equal(FreeSE("relu")(x, identity), torch.relu(x + identity))
    assert torch.equal(FreeSE("none")(x, identity), x + identity)
    assert FreeSE("none")(x) is x
    with torch.no_grad():
        assert free(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    module, report = model_bench._variant_module("se-free", model, training=False)
    assert report is None
    assert [p for p, m in module.named_modules() if isinstance(m, FreeSE)] == paths


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["bench", "--models", "se_resnet5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'se_resnet5'" in err
    assert "did you mean" in err and "se_resnet50" in err


def test_options_of_the_other_mode_are_a_clear_error(capsys):
    assert main(["bench", *TINY, "--modes", "forward"]) == 2
    assert "--modes forward: not a choice here (choose from inference, training)" in \
        capsys.readouterr().err
    assert main(["bench", *TINY, "--variants", "fused"]) == 2
    assert "--variants fused" in capsys.readouterr().err
    assert main(["bench", "--shapes", "8x3x3", "--modes", "training"]) == 2
    assert "--modes training: not a choice here" in capsys.readouterr().err


def test_missing_onnxruntime_is_a_note_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert "onnxruntime is not installed" in onnxruntime_unavailable(CPU)
    path = tmp_path / "no_ort.json"
    code, out = run_main(["bench", *TINY, "-n", "1", "--variants", "eager", "onnxruntime",
                          "--json", str(path)])
    assert code == 0
    assert out.startswith("onnxruntime skipped: onnxruntime is not installed")
    data = json.loads(path.read_text())
    assert data["notes"] == [out.splitlines()[0]]
    (row,) = data["results"]
    assert set(row["latency_ms"]) == {"eager"} and row["onnxruntime_check"] is None


def test_randomize_batchnorm_is_seeded_and_in_range():
    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), SE(16, reduction=4),
                             nn.BatchNorm1d(16, affine=False))

    first, second = randomize_batchnorm(model()), randomize_batchnorm(model())
    bn, plain = first[1], first[3]
    assert torch.equal(bn.running_mean, second[1].running_mean)
    assert torch.equal(bn.weight, second[1].weight)
    assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
    for values in (bn.running_var, bn.weight, plain.running_var):
        assert values.min() >= 0.5 and values.max() <= 1.5
    assert not torch.equal(bn.running_mean, plain.running_mean)
    assert not torch.equal(randomize_batchnorm(model(), seed=1)[1].weight, bn.weight)


def test_table_rows_line_up_and_notes_say_what_cells_do_not():
    times = {v: Stats(1000.0 * (i + 1), 900.0, 1100.0) for i, v in enumerate(VARIANTS)}
    result = ModelResult("net", 16, "inference", (3, 8, 8), times, 0,
                         OnnxCheck("legacy", 0.25), {"compile": "RuntimeError: boom"})
    header, separator = table_header(5).splitlines()
    row = format_row(result, 5)
    assert len(header) == len(separator) == len(row)
    assert header.count("|") == row.count("|") == 1 + 3 + len(VARIANTS) + len(SPEEDUPS)
    assert "|  16 | inference |     1.00 |" in row
    for name, (variant, baseline) in SPEEDUPS.items():  # variant i takes i + 1 ms
        assert result.speedup(name) == pytest.approx(
            (VARIANTS.index(baseline) + 1) / (VARIANTS.index(variant) + 1)), name
    notes = format_notes(result)
    assert notes[0] == "net N=16 inference: compile failed: RuntimeError: boom"
    assert "MISMATCH" in notes[1] and "legacy exporter" in notes[1]
    assert notes[2] == "net N=16 inference: convert found no SE block to convert"
