"""sae-kernels profile: SE shares per site, attribution of the backward, traces, plot, errors."""

import argparse
import json
import math

import pytest
import torch
from torch import nn
from torch.profiler import profile, record_function

from sae_kernels import FusedSaE, SaE
from sae_kernels.tools.profile import (
    BACKWARD_RANGE,
    MODES,
    SITE_RANGE,
    STAGES,
    ProfileError,
    _attribute,
    _site_ranges,
    add_arguments,
    build_model,
    format_report,
    plot_report,
    profile_model,
    run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    trace_dir = tmp_path_factory.mktemp("traces")
    return profile_model("senetv2_resnet18", batch_size=2, image_size=32, steps=1,
                         trace_dir=trace_dir, timed_steps=1)


def se_paths(model: nn.Module, se_class: type) -> list[str]:
    """The SE sites, found by class (independently of the converter)."""
    return [path for path, module in model.named_modules() if isinstance(module, se_class)]


def test_names_every_se_site_in_every_mode_and_stage(report):
    expected = se_paths(build_model("senetv2_resnet18")[0], SaE)
    assert len(expected) == 8
    assert [site.path for site in report.sites] == expected
    for mode in MODES:
        for stage in STAGES:
            profiled = getattr(report.modes[mode], stage)
            assert list(profiled.site_seconds) == expected
            assert all(seconds > 0 for seconds in profiled.site_seconds.values()), (mode, stage)


def test_shares_are_fractions_of_the_step(report):
    for mode, result in report.modes.items():
        for stage in STAGES:
            profiled = getattr(result, stage)
            shares = [profiled.share(site.path) for site in report.sites]
            assert all(0 <= share <= 1 for share in shares), (mode, stage, shares)
            assert math.isclose(profiled.se_share, sum(shares), rel_tol=1e-9)
            assert 0 < profiled.se_share <= 1
        assert result.reference_seconds > 0 and result.fused_seconds > 0


#: The fused operator's autograd nodes: the C++ op's, and the custom op's (what CUDA runs).
FUSED_NODES = ("SaeFunction", "GeneratedBackwardFor_sae_kernels_sae_forward")


@pytest.mark.parametrize("block", ["reference", "auto", "triton"])
def test_backward_is_attributed_to_its_site(block):
    """A site's time is its forward range plus the backward nodes of the ops inside it: for
    the C++ op (``auto`` on CPU) exactly its one node; the custom op's node for Triton."""
    if block == "triton" and torch.cuda.is_available():
        pytest.skip("Triton's interpreter (CPU tensors) runs only without a GPU")
    torch.manual_seed(0)
    se = SaE(16, reduction=4) if block == "reference" else FusedSaE(16, reduction=4,
                                                                    backend=block)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), se, nn.Conv2d(16, 4, 1)).train()
    x = torch.randn(2, 3, 12, 12)
    model(x).sum().backward()  # compiles the Triton kernels outside the profile
    with _site_ranges(model, ["1"]), profile() as profiler:
        with record_function("step"):
            model(x).sum().backward()
    events = profiler.events()
    site_us, step_us = _attribute(events, kernel_time=False)
    forward_us = sum(e.cpu_time_total for e in events if e.name == SITE_RANGE + "1")
    assert 0 < forward_us < site_us["1"] < step_us
    if block == "reference":
        return
    node_us = sum(e.cpu_time_total for e in events if e.name.startswith(BACKWARD_RANGE)
                  and any(node in e.name for node in FUSED_NODES))
    assert node_us > 0
    if block == "auto":
        assert math.isclose(site_us["1"], forward_us + node_us, rel_tol=1e-9)
    else:
        assert site_us["1"] >= (forward_us + node_us) * (1 - 1e-9)


def test_traces_are_chrome_json_with_the_site_ranges(report):
    assert len(report.traces) == len(MODES) * len(STAGES)
    for trace in report.traces:
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        assert {SITE_RANGE + site.path for site in report.sites} <= names, trace


def test_plot_writes_a_png(report, tmp_path):
    path = tmp_path / "shares.png"
    plot_report(report, path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert path.stat().st_size > 10_000


def test_json_and_table(report):
    data = json.loads(json.dumps(report.to_json()))
    assert data["model"] == "senetv2_resnet18" and data["device"] == "cpu"
    assert data["batch_size"] == 2 and data["input_shape"] == [3, 32, 32]
    assert data["sites"] == [site.path for site in report.sites]
    assert data["traces"] == [str(trace) for trace in report.traces]
    assert set(data["skipped"]) == set(MODES)
    for mode in MODES:
        assert data["modes"][mode]["speedup"] > 0
        for stage in STAGES:
            stage_data = data["modes"][mode][stage]
            assert stage_data["step_ms"] > 0 and 0 < stage_data["se_share"] <= 1
            assert set(stage_data["sites"]) == set(data["sites"])
    table = format_report(report)
    assert all(site.path in table for site in report.sites)
    assert "end-to-end speedup" in table


def test_torchvision_and_timm_names():
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    model, shape = build_model("mobilenetv3_small_050")
    assert isinstance(model, timm.models.MobileNetV3) and shape == (3, 224, 224)
    result = profile_model("mobilenet_v3_small", image_size=64, steps=1, modes=("inference",),
                           timed_steps=1)
    expected = se_paths(torchvision.models.mobilenet_v3_small(),
                        torchvision.ops.SqueezeExcitation)
    assert expected and [site.path for site in result.sites] == expected
    assert list(result.modes) == ["inference"]
    assert 0 < result.modes["inference"].fused.se_share <= 1


def test_unknown_model():
    with pytest.raises(ProfileError, match="unknown model 'se_resnet19'.*se_resnet18"):
        profile_model("se_resnet19")


def test_model_without_se_blocks():
    pytest.importorskip("torchvision")
    with pytest.raises(ProfileError, match="resnet18 has no SE block"):
        profile_model("resnet18", image_size=32)
    pytest.importorskip("timm")
    with pytest.raises(ProfileError, match=r"ecaresnet26t has no SE block .*ECA"):
        profile_model("ecaresnet26t", image_size=32)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_run_reports_an_unknown_model(capsys):
    assert run(parse(["no_such_model"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-kernels profile: unknown model 'no_such_model'")
    assert err.count("\n") == 1


def test_run_writes_table_json_plot_and_traces(tmp_path, capsys):
    args = parse(["se_resnet18", "--image-size", "32", "--steps", "1", "--mode", "inference",
                  "--device", "cpu", "--trace-dir", str(tmp_path / "traces"),
                  "--plot", str(tmp_path / "plot.png"), "--json", str(tmp_path / "report.json")])
    assert run(args) == 0
    assert "stages.3.1.excite" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "report.json").read_text())["modes"]) == ["inference"]
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == [
        "fused-inference.json", "reference-inference.json"]
