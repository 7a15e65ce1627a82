"""ONNX export of fused models: the fused calls lower to standard ONNX ops, and ONNX Runtime
runs the exported model at other batch sizes than the one it was exported with."""

import io
import warnings

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the dynamo exporter's translation library
onnxruntime = pytest.importorskip("onnxruntime")

from sae_kernels import FusedSaE, SaE, convert  # noqa: E402
from sae_kernels.blocks import FusedResidualBlock  # noqa: E402
from sae_kernels.kernels import cpu as cpu_kernels  # noqa: E402
from sae_kernels.kernels.cpu import composite_decompositions  # noqa: E402
from sae_kernels.options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS  # noqa: E402
from sae_kernels.tools.model_bench import randomize_batchnorm  # noqa: E402

#: Exported with this batch size, run with the others.
EXPORT_BATCH = 2
RUN_BATCHES = (1, 3)
#: fp32 ONNX Runtime against eager PyTorch on the original (unconverted) model: the same
#: arithmetic in other kernels (convolutions and GEMMs summed in another order, ONNX Runtime's
#: own fusions), a few fp32 roundings of each output relative to the largest one
#: (measured: below 1e-6). A block that lost a prologue, a shortcut or its gate is off by
#: the size of the output.
RELATIVE_TOLERANCE = 1e-5

needs_cpu_op = pytest.mark.skipif(not cpu_kernels.available(), reason="needs the C++ CPU kernels")


def _export(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    """``model`` as ONNX with a dynamic batch dimension, by either exporter."""
    if dynamo:
        batch = torch.export.Dim("batch")
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                    verbose=False)
        return program.model_proto.SerializeToString()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return buffer.getvalue()


def _check_runs_like(model_bytes: bytes, original: nn.Module, sample_shape: tuple) -> None:
    """The ONNX model holds standard ops only, and ONNX Runtime's output matches
    ``original`` at every batch size of ``RUN_BATCHES``."""
    graph = onnx.load_from_string(model_bytes).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, \
        sorted({f"{n.domain}::{n.op_type}" for n in graph.node})
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(1)
    for n in RUN_BATCHES:
        x = torch.randn(n, *sample_shape, generator=generator)
        (actual,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = original(x)
        bound = RELATIVE_TOLERANCE * expected.abs().max().item()
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=0, atol=bound,
                                   msg=lambda m, n=n: f"batch {n}: {m}")


def _fused_sae() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = SaE(256, 32, 4, residual=True).eval()
    return reference, FusedSaE.from_module(reference).eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_fused_sae_exports(dynamo):
    reference, fused = _fused_sae()
    x = torch.randn(EXPORT_BATCH, 256, 7, 7)
    _check_runs_like(_export(fused, x, dynamo), reference, (256, 7, 7))


@pytest.mark.parametrize("backend, under_compile", [("triton", "auto"), ("auto", "op")])
def test_export_traces_the_composite_whatever_the_compile_rule(backend, under_compile,
                                                                compile_setting):
    """ONNX export overrides the torch.compile rule: the Triton op (kept under
    torch.compile) and the C++ op traced as itself (the setting "op") both
    export as the composite."""
    compile_setting(under_compile)
    reference, _ = _fused_sae()
    fused = FusedSaE.from_module(reference, backend=backend).eval()
    x = torch.randn(EXPORT_BATCH, 256, 3, 5)
    _check_runs_like(_export(fused, x, dynamo=True), reference, (256, 3, 5))


@needs_cpu_op
def test_exported_program_holding_the_op_decomposes(compile_setting):
    """A program from torch.export that holds ``sae_kernels::cpu_sae`` (the op traced as
    itself) exports once its calls are replaced by the composite."""
    compile_setting("op")
    reference, fused = _fused_sae()
    x = torch.randn(EXPORT_BATCH, 256, 7, 7)
    program = torch.export.export(fused, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    op = torch.ops.sae_kernels.cpu_sae.default
    assert op in {node.target for node in program.graph.nodes}
    decomposed = program.run_decompositions(composite_decompositions())
    assert op not in {node.target for node in decomposed.graph.nodes}
    exported = torch.onnx.export(decomposed, dynamo=True, verbose=False)
    _check_runs_like(exported.model_proto.SerializeToString(), reference, (256, 7, 7))


@needs_cpu_op
@pytest.mark.parametrize("act_out, identity, single_fc, prologue_act", [
    ("relu", True, False, "silu"), ("none", True, False, "none"), ("none", False, True, "relu")])
def test_decomposition_computes_the_op(act_out, identity, single_fc, prologue_act):
    """The decomposition maps the op's arguments (branch lists, option codes) onto the
    composite's: every option is checked against the op itself."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    c, k = 6, 4
    x = randn(2, c, 3, 4)
    fc1_weights = [randn(c, c)] if single_fc else [randn(2, c), randn(2, c)]
    fc1_biases = [randn(w.shape[0]) for w in fc1_weights]
    fc2 = (None, None) if single_fc else (randn(c, k), randn(c))
    args = (x, fc1_weights, fc1_biases, *fc2, randn(2, c, 3, 4) if identity else None,
            ACTIVATIONS.index("silu"), GATES.index("hardsigmoid"), True, act_out == "relu",
            randn(c), randn(c), PROLOGUE_ACTIVATIONS.index(prologue_act))
    op = torch.ops.sae_kernels.cpu_sae.default
    torch.testing.assert_close(composite_decompositions()[op](*args), op(*args))


@needs_cpu_op
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_torchscript_trace_keeps_the_op():
    """Only an ONNX export traces the composite: a plain TorchScript trace records the op."""
    _, fused = _fused_sae()
    with torch.no_grad():
        traced = torch.jit.trace(fused, torch.randn(1, 256, 2, 2))
    assert "sae_kernels::cpu_sae" in str(traced.inlined_graph)


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["seresnet18", "efficientnet_b0"])
def test_converted_timm_model_exports(timm, name, dynamo):
    """A converted network, its absorbed BatchNorm + activation prologues and residual
    tails included, exports and runs like the original network."""
    original = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
    converted, _ = convert(original)
    absorbed = [m for m in converted.modules()
                if isinstance(m, FusedSaE) and m.prologue_norm is not None]
    assert absorbed, "no prologue absorbed: the export would not cover that path"
    if name == "seresnet18":
        assert any(isinstance(m, FusedResidualBlock) for m in converted.modules())
    x = torch.randn(EXPORT_BATCH, 3, 64, 64)
    _check_runs_like(_export(converted, x, dynamo), original, (3, 64, 64))

