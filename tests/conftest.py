"""Run the Triton kernels through Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so this runs before
any test module imports sae_kernels.
"""

import os
import sys

import pytest
import torch

if "triton" in sys.modules and not torch.cuda.is_available():
    raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    """Print how close the largest errors came to the tolerances (1.0 = at the bound)."""
    helpers = sys.modules.get("helpers")
    if helpers is not None and helpers.WORST:
        worst = ", ".join(f"{str(k).removeprefix('torch.')} {v:.3f}"
                          for k, v in helpers.WORST.items())
        terminalreporter.write_line(f"largest error / tolerance per dtype: {worst}")


@pytest.fixture
def compile_setting():
    """``sae_kernels.dispatch.set_under_compile`` for one test; the setting before the test
    comes back after it."""
    from sae_kernels.dispatch import set_under_compile, under_compile_setting

    previous = under_compile_setting()
    yield set_under_compile
    set_under_compile(previous)
