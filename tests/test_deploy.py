"""The ops exist from ``import sae_kernels``: saved traces, exports and AOTInductor packages
load and run in a fresh process, with the C++ library or with its PyTorch stand-ins; dynamic
shapes in export and torch.compile."""

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.export import Dim

from sae_kernels import FusedSaE, SaE
from sae_kernels.dispatch import set_under_compile
from sae_kernels.kernels import cpu, cpu_reference
from sae_kernels.options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS

needs_library = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels did not build")

#: Where the C++ library and the stand-ins meet in fresh processes: the library loaded
#: (cached), or the stand-ins on their own.
BACKENDS = {"library": {}, "stand_ins": {"SAE_KERNELS_NO_CPU_EXTENSION": "1"}}


def run_fresh(code: str, cwd, **env) -> str:
    """Run ``code`` in a new Python process (only ``import sae_kernels`` defines the ops)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                            env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ops_exist_from_import_without_the_library(tmp_path):
    out = run_fresh("""
        import torch, sae_kernels
        for name in ("cpu_sae", "cpu_forward", "cpu_backward"):
            print(getattr(torch.ops.sae_kernels, name).default._schema.name)
        """, tmp_path, SAE_KERNELS_NO_CPU_EXTENSION="1")
    assert out.split() == ["sae_kernels::cpu_sae", "sae_kernels::cpu_forward",
                           "sae_kernels::cpu_backward"]


def _operands(n, c, h, w, k_rows, single_fc, prologue_act, channels_last, dtype=torch.float64):
    g = torch.Generator().manual_seed(n * 1000 + c)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = rand(n, c, h, w)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    w1s = [rand(c if single_fc else rows, c) for rows in ([c] if single_fc else k_rows)]
    b1s = [rand(w.shape[0]) for w in w1s]
    k = sum(w.shape[0] for w in w1s)
    w2, b2 = (None, None) if single_fc else (rand(c, k), rand(c))
    scale, shift = (None, None) if prologue_act is None else (rand(c).abs() + 0.5, rand(c))
    return x, w1s, b1s, w2, b2, scale, shift


def _layout(t):
    """The strides that matter: those of dimensions longer than 1."""
    return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]


OPTION_GRID = [
    # (act, gate, residual, relu_out, identity, single_fc, prologue_act)
    *((a, g, False, False, False, False, None) for a, g in itertools.product(ACTIVATIONS, GATES)),
    ("relu", "sigmoid", True, True, True, False, None),
    ("silu", "sigmoid", False, True, False, False, "silu"),
    ("relu", "hardsigmoid", True, False, False, False, "hardswish"),
    ("relu", "sigmoid", False, True, True, False, "relu"),
    ("relu", "hardsigmoid", False, False, False, True, "none"),
]
SHAPES = [(3, 19, 5, 4), (2, 1, 3, 3), (2, 3, 1, 1), (0, 19, 4, 4)]


@needs_library
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(map(str, o)))
def test_stand_ins_compute_what_the_library_computes(options, shape, channels_last):
    """cpu_forward and cpu_backward of the library against the stand-ins, in float64: the
    same formulas, so only the order of the sums differs (1e-12 is ~5000 ulps of 1)."""
    act, gate, residual, relu_out, with_identity, single_fc, prologue_act = options
    x, w1s, b1s, w2, b2, scale, shift = _operands(*shape, [2, 3], single_fc, prologue_act,
                                                  channels_last)
    identity = torch.randn_like(x) if with_identity else None
    codes = (ACTIVATIONS.index(act), GATES.index(gate), residual, relu_out)
    p_act = PROLOGUE_ACTIVATIONS.index(prologue_act or "none")
    forward_args = (x, w1s, b1s, w2, b2, identity, *codes, scale, shift, p_act)
    library = torch.ops.sae_kernels.cpu_forward(*forward_args)
    stand_in = cpu_reference.forward(*forward_args)
    for name, a, b in zip("yzpu", library, stand_in, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert _layout(library[0]) == _layout(stand_in[0])
    y, z, p, u = library
    grad = torch.randn_like(x)
    backward_args = (grad, x, y if relu_out else None, w1s, w2, z, p, u, *codes, with_identity,
                     scale, shift, p_act, prologue_act is not None)
    library = torch.ops.sae_kernels.cpu_backward(*backward_args)
    stand_in = cpu_reference.backward(*backward_args)
    fake = cpu_reference.backward_fake(*backward_args)
    names = ["dx", "d_identity", "dw1", "db1", "dw2", "db2", "d_scale", "d_shift"]
    for name, a, b, f in zip(names, library, stand_in, fake, strict=True):
        for aa, bb, ff in zip(*((t if isinstance(t, list) else [t]) for t in (a, b, f)),
                              strict=True):
            torch.testing.assert_close(aa, bb, rtol=1e-12, atol=1e-12, msg=name)
            assert (aa.shape, aa.dtype) == (ff.shape, ff.dtype), name


def test_stand_in_is_differentiable_in_every_input():
    """The stand-in of cpu_sae under autograd: every gradient as the reference module's."""
    torch.manual_seed(0)
    ref = SaE(19, rd_channels=3, cardinality=2, residual=True, act_out="relu").double()
    x = torch.randn(3, 19, 5, 4, dtype=torch.float64, requires_grad=True)
    identity = torch.randn_like(x, requires_grad=True)
    y = cpu_reference.sae(x, [b.weight for b in ref.branches], [b.bias for b in ref.branches],
                          ref.excite.weight, ref.excite.bias, identity, 0, 0, True, True)
    y_ref = ref(x, identity)
    torch.testing.assert_close(y, y_ref)
    inputs = [x, identity, *ref.parameters()]
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(y_ref, inputs, grad),
                    strict=True):
        torch.testing.assert_close(a, b)


def _block():
    """A fused block with every epilogue, and an example input."""
    torch.manual_seed(0)
    block = FusedSaE(64, 8, 4, residual=True, act_out="relu").eval()
    return block, (torch.randn(2, 64, 7, 7), torch.randn(2, 64, 7, 7))


@pytest.fixture(scope="module")
def block_and_example():
    return _block()


def _saved_block(tmp_path):
    """The fused block, its example, and inputs and outputs saved for a fresh process."""
    block, (x, identity) = _block()
    bigger = (torch.randn(3, 64, 5, 9), torch.randn(3, 64, 5, 9))
    with torch.no_grad():
        torch.save({"inputs": [(x, identity), bigger],
                    "outputs": [block(x, identity), block(*bigger)]}, tmp_path / "io.pt")
    return block, (x, identity)


CHECK_SAVED = """
    import torch, sae_kernels
    io = torch.load("io.pt")
    run = {loader}
    for inputs, want in zip(io["inputs"], io["outputs"]):
        got = run(*inputs)
        assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    print("ok")
    """


@needs_library
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_trace_runs_in_a_fresh_process(tmp_path, backend):
    block, example = _saved_block(tmp_path)
    with torch.no_grad():
        traced = torch.jit.trace(block, example)
    assert "sae_kernels::cpu_sae" in str(traced.inlined_graph)
    traced.save(str(tmp_path / "traced.pt"))
    loader = 'torch.jit.load("traced.pt")'
    assert "ok" in run_fresh(CHECK_SAVED.format(loader=loader), tmp_path, **BACKENDS[backend])


def _export_dynamic(block, example):
    batch, h, w = Dim("batch"), Dim("h"), Dim("w")
    shapes = {0: batch, 2: h, 3: w}
    return torch.export.export(block, example, dynamic_shapes=(shapes, shapes))


@needs_library
@pytest.mark.parametrize("under_compile", ["op", "composite"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_export_with_dynamic_shapes_runs_in_a_fresh_process(tmp_path, compile_setting,
                                                                  backend, under_compile):
    """Exported with dynamic batch and spatial sizes, run at other sizes after a load."""
    compile_setting(under_compile)
    block, example = _saved_block(tmp_path)
    program = _export_dynamic(block, example)
    targets = {str(n.target) for n in program.graph.nodes}
    assert ("sae_kernels.cpu_sae.default" in targets) == (under_compile == "op")
    torch.export.save(program, tmp_path / "exported.pt2")
    loader = 'torch.export.load("exported.pt2").module()'
    assert "ok" in run_fresh(CHECK_SAVED.format(loader=loader), tmp_path, **BACKENDS[backend])


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory, block_and_example):
    """An AOTInductor package of the fused block, its graph calling the op (kept as the op)."""
    if not cpu.available():
        pytest.skip("the C++ CPU kernels did not build")
    block, example = block_and_example
    previous = set_under_compile("op")
    try:
        program = _export_dynamic(block, example)
    finally:
        set_under_compile(previous)
    assert "sae_kernels.cpu_sae.default" in {str(n.target) for n in program.graph.nodes}
    path = tmp_path_factory.mktemp("aoti") / "aoti.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_aoti_package_with_the_op_runs_in_a_fresh_process(tmp_path, aoti_package, backend):
    """Loaded after a plain import, with the library or with the stand-ins."""
    _saved_block(tmp_path)
    loader = f'torch._inductor.aoti_load_package("{aoti_package}")'
    assert "ok" in run_fresh(CHECK_SAVED.format(loader=loader), tmp_path, **BACKENDS[backend])


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_program_serves_the_aoti_package_with_the_library(tmp_path, aoti_package):
    """A C++ program (tests/cpp/serve_aoti.cpp) loads the kernels' library, and with it the
    ops, then runs the package: no Python in the process."""
    from torch.utils import cpp_extension

    program = tmp_path / "serve_aoti"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libraries = cpp_extension.library_paths()
    subprocess.run(["g++", "-std=c++20", "-O1", str(Path(__file__).parent / "cpp" /
                                                      "serve_aoti.cpp"), "-o", str(program),
                    *includes, *(f"-L{p}" for p in libraries), "-ltorch", "-ltorch_cpu", "-lc10",
                    *(f"-Wl,-rpath,{p}" for p in libraries)], check=True, capture_output=True)
    shape = (3, 64, 5, 9)
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libraries)}
    result = subprocess.run([program, aoti_package, cpu.library_path(), *map(str, shape)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sizes, total = result.stdout.rsplit(maxsplit=1)
    block = _saved_block(tmp_path)[0]
    with torch.no_grad():
        want = block(torch.ones(shape), torch.zeros(shape))
    assert sizes == "[" + ", ".join(map(str, shape)) + "]"
    assert float(total) == pytest.approx(want.sum().item(), rel=1e-5)


@pytest.mark.parametrize("under_compile", ["op", "composite"])
def test_compile_dynamic_is_one_graph_for_every_batch(compile_setting, under_compile):
    compile_setting(under_compile)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = FusedSaE(32, 8, 2, residual=True, act_out="relu")
    reference = SaE(32, 8, 2, residual=True, act_out="relu")
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for n, size in ((2, 5), (3, 5), (5, 7)):
        x = torch.randn(n, 32, size, size, requires_grad=True)
        identity = torch.randn_like(x)
        y = compiled(x, identity)
        torch.testing.assert_close(y, reference(x, identity), rtol=1e-5, atol=1e-5)
        y.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
