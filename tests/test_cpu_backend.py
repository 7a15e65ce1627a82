"""The C++ CPU backend against the float64 reference, its fallbacks and determinism."""

import contextlib
import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

from helpers import EPILOGUES, LAYOUTS, Case, check_case
from sae_kernels import FusedSaE, SaE
from sae_kernels.functional import sae
from sae_kernels.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels did not build")

#: the dtypes the C++ kernels take
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (13, 17), (56, 56)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", [1, 3, 19, 228])
def test_shapes(c, hw, n, layout):
    check_case(Case(n, c, *hw, channels_last=LAYOUTS[layout], backend="cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 19, 13, 17), (2, 300, 7, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dtypes(shape, dtype, weights, layout):
    if weights == "fp32" and dtype != "bf16":
        pytest.skip("same as weights='same'")
    check_case(Case(*shape, dtype=DTYPES[dtype], channels_last=LAYOUTS[layout],
                    weight_dtype=torch.float32 if weights == "fp32" else None,
                    with_identity=True, act_out="relu", backend="cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu", "hardswish", "gelu"])
def test_options(act, gate, epilogue, layout):
    residual, with_identity, act_out = EPILOGUES[epilogue]
    check_case(Case(3, 19, 7, 7, act=act, gate=gate, residual=residual,
                    with_identity=with_identity, act_out=act_out, cardinality=4,
                    channels_last=LAYOUTS[layout], backend="cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 19, 13, 17), (1, 1, 1, 1), (0, 3, 2, 2), (7, 64, 30, 30)],
                         ids=lambda s: "x".join(map(str, s)))
def test_single_fc(shape, dtype, layout):
    """The single-FC form (effective SE), across chunks of samples for the last shape."""
    check_case(Case(*shape, single_fc=True, gate="hardsigmoid", dtype=DTYPES[dtype],
                    channels_last=LAYOUTS[layout], backend="cpu"))


#: A script's preamble: the test helpers, importable from the repository root.
CHECKS = "import torch, sys; sys.path.insert(0, 'tests'); from helpers import Case, check_case\n"


def run_checks(code: str, **env: str) -> subprocess.CompletedProcess:
    """``CHECKS + code`` in a fresh interpreter with ``env`` added: the kernels read these
    variables once per process."""
    return subprocess.run([sys.executable, "-c", CHECKS + code], env={**os.environ, **env},
                          capture_output=True, text=True)


def test_chunks_of_samples():
    """A batch larger than one chunk: 2 samples of 230 KB per chunk, a partial last one,
    every loop of the forward run by one team of threads across the chunks; with the
    prologues whose x' the pool leaves in each chunk's part of y."""
    result = run_checks("from test_prologue import check_prologue\n"
                        "torch.set_num_threads(2)\n"
                        "for cl in (False, True):\n"
                        "    check_case(Case(7, 64, 30, 30, channels_last=cl, backend='cpu',\n"
                        "                    with_identity=True, act_out='relu'))\n"
                        "    for act in ('silu', 'hardswish'):\n"
                        "        check_prologue(7, 64, 30, 30, act=act, channels_last=cl,\n"
                        "                       epilogue='residual_identity_relu')\n"
                        "print('checked')\n", SAE_KERNELS_CPU_CHUNK_BYTES=str(500_000))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "checked"


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set(isa):
    """Each compiled instruction set (where the CPU has it) within the accuracy contract."""
    result = run_checks(
        "from sae_kernels.kernels import cpu\n"
        "check_case(Case(3, 40, 9, 11, backend='cpu', with_identity=True, act_out='relu'))\n"
        "check_case(Case(2, 40, 9, 11, backend='cpu', channels_last=True,\n"
        "                dtype=torch.bfloat16, weight_dtype=torch.float32))\n"
        "print(cpu.isa())\n", SAE_KERNELS_CPU_ISA=isa)
    if "lacks" in result.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == isa


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` for the block, then restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def test_one_and_two_threads_give_the_same_bits():
    torch.manual_seed(0)
    ref = SaE(300, reduction=8, cardinality=4, act_out="relu")
    fused = FusedSaE.from_module(ref, backend="cpu")
    x = torch.randn(5, 300, 12, 12).to(memory_format=torch.channels_last)
    identity, grad = torch.randn_like(x), torch.randn_like(x)
    results = []
    for t in (1, 2):
        with torch_threads(t):
            for xx in (x, x.contiguous()):
                xx = xx.clone().requires_grad_(True)
                fused.zero_grad()
                y = fused(xx, identity)
                y.backward(grad)
                results.append([y, xx.grad, *(p.grad for p in fused.parameters())])
    for one, two in ((results[0], results[2]), (results[1], results[3])):
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sample_gets_the_same_bits_in_any_batch(layout, threads):
    """The FC tiles differ with the batch (4 outputs x 4 samples, 8 outputs x 1 sample for
    what is left over), and a lone NCHW sample computes FC2 in the rescale's pieces instead
    of a loop of its own; every (row, sample) dot product still sums in one order."""
    torch.manual_seed(0)
    ref = SaE(300, reduction=8, cardinality=4, act_out="relu")
    fused = FusedSaE.from_module(ref, backend="cpu").eval()
    x = torch.randn(7, 300, 5, 5)
    if LAYOUTS[layout]:
        x = x.to(memory_format=torch.channels_last)
    with torch_threads(threads), torch.no_grad():
        whole = fused(x, x)
        for i in range(len(x)):
            assert torch.equal(fused(x[i:i + 1], x[i:i + 1]), whole[i:i + 1])


#: (FC activation, gate, prologue activation): each of every kind at least once
UNDERFLOW_CASES = [("relu", "sigmoid", "silu"), ("silu", "sigmoid", "hardswish"),
                   ("gelu", "hardsigmoid", "relu"), ("hardswish", "sigmoid", "none")]


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="reads the x86 floating-point status flags through glibc")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_ordinary_values_never_underflow(dtype, layout):
    """No instruction of the kernels gives a subnormal result on ordinary inputs. One did
    where a vector loop computed, for every lane, a value it then discarded (silu's value
    below exp's range: a division more per element, and the silu prologue's backward took
    1.5x the time), and subnormal results are slow on many CPUs without flush-to-zero.
    The SSE underflow flag, cleared before the forward and read after each pass, says
    whether one did; one thread, so that every kernel runs on the thread whose flags are
    read."""
    libm = ctypes.CDLL("libm.so.6")
    fe_underflow, fe_all = 0x10, 0x3D  # <fenv.h> on x86
    torch.manual_seed(0)
    x = torch.randn(3, 40, 9, 9, dtype=DTYPES[dtype])
    if LAYOUTS[layout]:
        x = x.to(memory_format=torch.channels_last)
    scale, shift = torch.rand(40) + 0.5, torch.randn(40) * 0.1
    with torch_threads(1):
        for act, gate, prologue in UNDERFLOW_CASES:
            fused = FusedSaE(40, reduction=4, act=act, gate=gate, backend="cpu").to(x.dtype)
            xx = x.clone().requires_grad_(True)
            args = (scale, shift) if prologue != "none" else (None, None)
            libm.feclearexcept(fe_all)
            y = sae(xx, *fused.stacked_fc1(), fused.excite.weight, fused.excite.bias, act=act,
                    gate=gate, backend="cpu", prologue_scale=args[0], prologue_shift=args[1],
                    prologue_act=prologue)
            assert not libm.fetestexcept(fe_underflow), f"forward, {act} {gate} {prologue}"
            y.backward(torch.randn_like(y))
            assert not libm.fetestexcept(fe_underflow), f"backward, {act} {gate} {prologue}"


#: (4, 64, 32, 32) in float64: 2 MiB, an output the op takes from its output pool
POOLED_SHAPE = (4, 64, 32, 32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_outputs_reuse_released_memory(layout):
    """Outputs of 1 MiB or more (y; the backward's dx and d_identity) come from the output
    pool (csrc/output_pool.h): a released output's memory goes to the next output of its
    size, a live one's never, and the values are the reference's whatever that memory
    held before, forward and backward."""
    torch.manual_seed(0)
    ref = SaE(64, reduction=4, cardinality=2, act_out="relu").double()
    fused = FusedSaE.from_module(ref, backend="cpu")
    memory_format = torch.channels_last if LAYOUTS[layout] else torch.contiguous_format

    def operand():
        x = torch.randn(POOLED_SHAPE, dtype=torch.float64)
        return x.contiguous(memory_format=memory_format).requires_grad_()

    x, identity = operand(), operand()
    with torch.no_grad():
        first = fused(operand(), operand())
        address = first.data_ptr()
        del first
        second = fused(x, identity)
        third = fused(x, identity)
    assert second.data_ptr() == address != third.data_ptr()
    assert second.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(second, ref(x, identity))
    grad = torch.randn_like(second)
    torch.autograd.backward(fused(x, identity), grad)
    fused_grads = x.grad, identity.grad
    x.grad = identity.grad = None
    torch.autograd.backward(ref(x, identity), grad)
    torch.testing.assert_close(fused_grads, (x.grad, identity.grad))


def test_the_output_pool_can_be_switched_off():
    """SAE_KERNELS_CPU_OUTPUT_POOL_BYTES=0: a released output's memory goes back to the
    allocator, which hands it to the next tensor of its size."""
    code = ("import torch\n"
            "from sae_kernels import FusedSE\n"
            "fused = FusedSE(64, reduction=4, backend='cpu').double()\n"
            f"x = torch.randn({POOLED_SHAPE}, dtype=torch.float64)\n"
            "with torch.no_grad():\n"
            "    y = fused(x)\n"
            "    address = y.data_ptr()\n"
            "    del y\n"
            "    other = torch.empty_like(x)  # the allocator's, where the pool is off\n"
            "    print(fused(x).data_ptr() == address)\n")
    reused = {}
    for pool_bytes in ("0", str(64 << 20)):
        env = {**os.environ, "SAE_KERNELS_CPU_OUTPUT_POOL_BYTES": pool_bytes}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        reused[pool_bytes] = result.stdout.split()[-1]
    assert reused == {"0": "False", str(64 << 20): "True"}


def test_fp16_falls_back_with_a_warning():
    fused = FusedSaE(8, reduction=2, backend="cpu").half()
    ref = SaE(8, reduction=2).half()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 3, 3).half()
    with pytest.warns(RuntimeWarning, match="float16 uses the PyTorch reference path"):
        y = fused(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_cpu_backend_on_a_cuda_tensor_is_an_error():
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        from sae_kernels.dispatch import resolve_backend

        resolve_backend("cpu", torch.device("cuda", 0), torch.float32)


def test_falls_back_when_the_extension_cannot_build(tmp_path):
    """No usable compiler: a warning, then the reference path; never a crash."""
    code = ("import warnings, torch\n"
            "from sae_kernels import FusedSaE, SaE\n"
            "ref = SaE(8, reduction=2); fused = FusedSaE.from_module(ref)\n"
            "x = torch.randn(2, 8, 3, 3)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    y = fused(x)\n"
            "assert torch.equal(y, ref(x))\n"
            "print([str(m.message) for m in w])\n")
    env = {**os.environ, "CXX": "/nonexistent/c++", "SAE_KERNELS_BUILD_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the C++ CPU kernels are unavailable" in result.stdout


def test_opcheck():
    x = torch.randn(2, 5, 3, 4)
    w1, b1, w2, b2 = torch.randn(6, 5), torch.randn(6), torch.randn(5, 6), torch.randn(5)
    w1b = torch.randn(2, 5)
    x_cl = x.to(memory_format=torch.channels_last)
    for args in [(x, [w1], [b1], w2, b2, torch.randn_like(x), 1, 0, True, True),
                 (x_cl, [w1[:4], w1b], [], torch.randn(5, 6), None, None, 3, 1, False, False),
                 (x, [torch.randn(5, 5)], [torch.randn(5)], None, None, None, 0, 1, False,
                  False)]:
        def grad(a):
            return a.clone().requires_grad_(True)
        args = tuple(grad(a) if isinstance(a, torch.Tensor) else
                     [grad(t) for t in a] if isinstance(a, list) else a for a in args)
        torch.library.opcheck(torch.ops.sae_kernels.cpu_sae.default, args)
