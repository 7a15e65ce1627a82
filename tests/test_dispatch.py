"""Backend resolution."""

import os
import subprocess
import sys

import pytest
import torch

from sae_kernels import FusedSaE, SaE
from sae_kernels.dispatch import resolve_backend
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
