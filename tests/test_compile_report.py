"""Every kernel launch the host code makes builds for sm_80 and sm_90 with no register
spills, specialised as Triton's launcher specialises it (ahead-of-time compilation: no GPU
needed). Triton runs here without its interpreter, so each test runs in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_python(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


#: Two parts of the report, each GPU's plans built for its own architecture and each dtype
#: on one of the two, so that every kernel, dtype, shape, layout, batch size and strategy,
#: both GPUs' plans and both architectures are built (``sae-kernels compile-report``
#: builds the whole product: each plan for both architectures, in every dtype).
PARTS = [("sm_80", "a100", ["fp32", "bf16"]), ("sm_90", "h100", ["fp16", "fp64"])]


@pytest.mark.parametrize("target, gpu, dtypes", PARTS)
def test_every_kernel_launch_builds_without_spills(target, gpu, dtypes):
    options = [f"--dtype={dtype}" for dtype in dtypes]
    result = run_python("-m", "sae_kernels", "compile-report", f"--target={target}",
                        f"--gpu={gpu}", *options, timeout=1500)
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith(target) and not line.endswith("  ok")]
    assert result.returncode == 0 and not failed, "\n".join(failed[:20]) + result.stderr[-3000:]
    assert lines[-1].endswith("builds, 0 failed or spilled")
    assert lines[-2] == "kernels no launch reached: none"  # each part reaches every kernel
    assert sum(line.startswith(target) for line in lines) > 100


SPECIALISATION = '''
import json
import torch
from sae_kernels.kernels import sae_triton
from sae_kernels.tools import aot


def specialisation(c, offset):
    """The single-launch forward's build for x (2, c, 7, 7), ``offset`` elements past an
    aligned allocation."""
    x = torch.empty(2 * c * 49 + offset)[offset:].view(2, c, 7, 7)
    weights = torch.empty(8, c), None, torch.empty(c, 8), None
    with aot.recording() as launches:
        sae_triton.forward(x, *weights, None, "relu", "sigmoid", False, "none", "single")
    build = aot.specialise(launches[0], "sm_90")
    return {"kernel": build.kernel, "divisible": build.divisible_by_16,
            "constants": build.specialised, "signature": build.signature}


print(json.dumps({f"C={c} offset={offset}": specialisation(c, offset)
                  for c, offset in [(32, 0), (19, 0), (32, 1)]}))
'''


def test_specialisation_follows_the_argument_values():
    """As at a launch on a GPU: a 16-byte aligned pointer and a C divisible by 16 get the
    divisibility hint, a C of 19 or a pointer 4 bytes off does not; the unit HW stride of
    NCHW is compiled in as a constant."""
    result = run_python("-c", SPECIALISATION, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout)
    aligned, odd_c, misaligned = (builds[k] for k in ("C=32 offset=0", "C=19 offset=0",
                                                      "C=32 offset=1"))
    assert aligned["kernel"] == "sae_forward_single_kernel"
    assert {"x_ptr", "C"} <= set(aligned["divisible"])
    assert "x_sc" not in aligned["divisible"]  # 49
    assert aligned["constants"]["x_shw"] == 1 and aligned["signature"]["x_shw"] == "constexpr"
    assert aligned["signature"]["x_ptr"] == "*fp32" and aligned["signature"]["C"] == "i32"
    assert "x_ptr" in odd_c["divisible"] and "C" not in odd_c["divisible"]
    assert "x_ptr" not in misaligned["divisible"] and "C" in misaligned["divisible"]


FIXTURE = '''
import sys
import torch
import triton
import triton.language as tl
from sae_kernels import __main__ as cli
from sae_kernels import gpu_plan
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


def launch_fc1():
    """The operator's own FC1 launch, which Triton pipelines."""
    w = torch.empty(16, 64)
    sae_triton.sae_fc1_kernel[(1, 1, 1)](x, w, 64, 1, w, x, x, x, 16, 64, 16, 49, 1, 64,
                                         HAS_B1=False, HAS_FC2=True, BLOCK_N=16, BLOCK_M=16,
                                         BLOCK_R=16, num_warps=4)


# host code launching them, recorded as the operator's host code is
sae_triton.fails_kernel, sae_triton.spills_kernel = fails_kernel, spills_kernel
x = torch.empty(128 * 128)
calls = {"fails": lambda: sae_triton.fails_kernel[(1,)](x, x, 128),
         "spills": lambda: sae_triton.spills_kernel[(1,)](x, x, 128, BLOCK=128, num_warps=1),
         "pipelined unlike the model": launch_fc1,
         "more resident than its shared memory holds": launch_fc1}
if sys.argv[1] == "pipelined unlike the model":
    gpu_plan.fc_pipelined = lambda kernel, single_fc, one_chunk: False
if sys.argv[1] == "more resident than its shared memory holds":
    gpu_plan.resident_programs = lambda spec, num_warps, registers: 200
aot.host_calls = lambda dtypes: iter([(sys.argv[1], calls[sys.argv[1]])])
sys.exit(cli.main(["compile-report", "--target", "sm_80"]))
'''


@pytest.mark.parametrize("kind, status", [
    ("fails", "arange's range must be a power of 2"), ("spills", "spills: "),
    ("pipelined unlike the model", "loop pipelined, the model (gpu_plan.fc_pipelined) says "
                                   "not pipelined"),
    ("more resident than its shared memory holds", "programs per SM of an A100 SXM, the model "
                                                   "counts 200")])
def test_exit_code_on_a_build_that_fails_spills_or_is_not_as_modelled(kind, status, tmp_path):
    """The real command on fixture kernels launched in place of the operator's, and on the
    operator's FC1 under a model that expects its loop not to be pipelined, or more of its
    programs on an SM than its shared memory lets on."""
    script = tmp_path / "fixture.py"  # Triton reads a kernel's source from its file
    script.write_text(FIXTURE)
    result = run_python(str(script), kind, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert status in result.stdout and "1 kernel builds, 1 failed or spilled" in result.stdout
