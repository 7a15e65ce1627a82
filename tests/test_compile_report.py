"""Every kernel configuration the dispatcher can choose builds for sm_80 and sm_90 with
no register spills (ahead-of-time compilation: no GPU needed)."""

import os
import subprocess
import sys

import pytest


def test_every_kernel_builds_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "sae_kernels", "compile-report"], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1].endswith("builds, 0 failed or spilled")
    assert sum(line.startswith("sm_80") for line in lines) == sum(
        line.startswith("sm_90") for line in lines) > 100


FIXTURE = '''
import sys
import triton
import triton.language as tl
from sae_kernels import __main__ as cli
from sae_kernels.kernels import sae_triton
from sae_kernels.tools import aot


@triton.jit
def fails_kernel(x_ptr, y_ptr, N):
    offs = tl.arange(0, 3)  # not a power of two: does not compile
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def spills_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rows[:, None] * N + rows[None, :])  # BLOCK**2 live values
    scaled = tile * tl.sum(tile, axis=0)[None, :]  # the whole tile live across the sum
    tl.store(y_ptr + rows[:, None] * N + rows[None, :], scaled)


sae_triton.fails_kernel, sae_triton.spills_kernel = fails_kernel, spills_kernel
fixture = {"fails": [(aot.Variant("fails_kernel", "fp32", "nchw", ()), 4)],
           "spills": [(aot.Variant("spills_kernel", "fp32", "nchw", (("BLOCK", 128),)), 1)]}
aot.variants = lambda: iter(fixture[sys.argv[1]])
sys.exit(cli.main(["compile-report", "--target", "sm_80"]))
'''


@pytest.mark.parametrize("kind, status", [("fails", "arange's range must be a power of 2"),
                                          ("spills", "spills: ")])
def test_exit_code_on_a_kernel_that_fails_or_spills(kind, status, tmp_path):
    """The real command on fixture kernels swapped in for the dispatcher's variants."""
    script = tmp_path / "fixture.py"  # Triton reads a kernel's source from its file
    script.write_text(FIXTURE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), kind], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert status in result.stdout and "1 kernel builds, 1 failed or spilled" in result.stdout
