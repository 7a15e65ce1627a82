"""Backend resolution, the launch planner and its cost model."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import DEVICE, Case, check_case
from sae_kernels import FusedSaE, SaE, dispatch
from sae_kernels.dispatch import (
    GPU_MAX_CONTIGUOUS_BLOCK,
    GPU_TILE_ELEMENTS,
    H100,
    estimate_seconds,
    plan_launch,
    resolve_backend,
)
from sae_kernels.kernels import cpu as cpu_kernels


def test_auto_backend_by_device():
    cpu_backend = "cpu" if cpu_kernels.available() else "reference"
    f32 = torch.float32
    assert resolve_backend("auto", torch.device("cpu"), f32) == cpu_backend
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == cpu_backend
    assert resolve_backend("auto", torch.device("cuda", 0), f32) == "triton"
    assert resolve_backend("triton", torch.device("cpu"), f32) == "triton"
    assert resolve_backend("reference", torch.device("cuda", 0), f32) == "reference"
    with pytest.warns(RuntimeWarning, match="float16 uses the PyTorch reference path"):
        assert resolve_backend("auto", torch.device("cpu"), torch.float16) == "reference"


def test_auto_backend_never_runs_the_interpreter_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr("sae_kernels.ops.sae_forward", refuse)
    block = FusedSaE(8, reduction=2)  # backend="auto"
    ref = SaE(8, reduction=2)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x), ref(x))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, sae_kernels\n"
            "m = sae_kernels.FusedSaE(8, reduction=2, backend='triton')\n"
            "try:\n    m(torch.randn(1, 8, 3, 3))\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "TRITON_INTERPRET=1" in out


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiles_follow_the_contiguous_axis(channels_last):
    plan = plan_launch(8, 256, 3136, 16, 4, channels_last, torch.device("cpu"), profile=H100)
    assert plan.block_c * plan.block_hw <= GPU_TILE_ELEMENTS
    contiguous = plan.block_c if channels_last else plan.block_hw
    assert contiguous == GPU_MAX_CONTIGUOUS_BLOCK
    for n, c, hw in [(1, 1, 1), (3, 19, 221), (2, 3, 1)]:  # tiles never exceed the tensor
        plan = plan_launch(n, c, hw, 5, 4, channels_last, torch.device("cpu"), profile=H100)
        assert plan.block_c <= max(1, 2 * c - 1) and plan.block_hw <= max(1, 2 * hw - 1)
        assert plan.hw_chunk % plan.block_hw == 0 and plan.hw_chunk >= plan.block_hw


def test_cost_model_choices():
    cpu = torch.device("cpu")
    # many samples fill the GPU with one program each: one launch
    assert plan_launch(256, 256, 3136, 16, 2, False, cpu, profile=H100).strategy == "single"
    assert plan_launch(132, 2048, 49, 128, 2, False, cpu, profile=H100).strategy == "single"
    # one large sample would run on one SM: split it across the GPU
    assert plan_launch(1, 256, 3136, 16, 2, False, cpu, profile=H100).strategy == "split"
    # a tiny sample costs less than a second launch
    assert plan_launch(1, 64, 49, 4, 2, False, cpu, profile=H100).strategy == "single"
    # the model is monotone in the traffic
    assert estimate_seconds("split", 1, 10**6, 132) < estimate_seconds("split", 1, 10**7, 132)


def test_split_grid_fills_the_device():
    plan = plan_launch(1, 256, 3136, 16, 4, False, torch.device("cpu"), "split", profile=H100)
    programs = (256 // plan.block_c) * plan.hw_chunks(3136)
    assert programs >= H100.sms


@pytest.mark.parametrize("strategy", ["single", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_tiles_through_the_interpreter(monkeypatch, strategy, channels_last):
    """The tiles and grids a GPU gets (not the interpreter's) on a shape with several
    channel blocks, HW steps and chunks."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(dispatch, "device_profile", lambda device: H100)
    check_case(Case(2, 40, 23, 29, cardinality=3, channels_last=channels_last,
                    strategy=strategy, with_identity=True, act_out="relu", residual=True))
