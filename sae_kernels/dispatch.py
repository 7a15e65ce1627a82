"""Which backend runs a call, and how the Triton kernels are launched for a shape.

Backends:
    ``"triton"``     the Triton kernels; on a CPU tensor they run through Triton's
                     interpreter (``TRITON_INTERPRET=1`` before triton is imported),
                     which is for correctness checks only.
    ``"cpu"``        the C++ kernels of csrc/ (``kernels/cpu.py``) for float32, float64
                     and bfloat16 CPU tensors. float16, or an extension that could not be
                     built, falls back to the reference with a warning.
    ``"reference"``  the PyTorch composite of ``reference.sae_reference``.
    ``"auto"``       Triton for CUDA tensors, ``"cpu"`` for CPU tensors.

Triton strategies (kernels in ``kernels/sae_triton.py``, plans and their model in
``gpu_plan.py``):
    ``"single"``  one launch, one program per sample (the forward);
    ``"split"``   sample-major pool and rescale grids over the device, the FCs batched
                  over the samples between them;
    ``"auto"``    the cheaper by the model of ``gpu_plan``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .kernels import cpu as cpu_kernels

BACKENDS = ("auto", "cpu", "triton", "reference")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
STRATEGIES = ("auto", "single", "split")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return strategy


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call: ``"cpu"``, ``"triton"`` or ``"reference"``."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend != "cpu":
        return backend
    if device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if dtype not in CPU_DTYPES:
        warnings.warn(f"sae_kernels: the CPU kernels take float32, float64 and bfloat16; "
                      f"{dtype} uses the PyTorch reference path", RuntimeWarning, stacklevel=3)
        return "reference"
    return "cpu" if cpu_kernels.available() else "reference"


#: What torch.compile and torch.export trace: ``"auto"`` (the rules of :func:`runs_composite`
#: and :func:`cpu_excitation_for`), ``"op"`` (the fused op) or ``"composite"`` (the ATen
#: composite, its FCs included).
UNDER_COMPILE = ("auto", "op", "composite")


def _checked_setting(setting: str, source: str) -> str:
    if setting not in UNDER_COMPILE:
        raise ValueError(f"{source} must be one of {', '.join(UNDER_COMPILE)}, got {setting!r}")
    return setting


# A module global, not a read of the environment at trace time: dynamo guards on the globals
# a traced function reads, so a graph traced under one setting is traced again under another,
# while what it reads from the environment becomes a constant of the graph, unguarded.
_under_compile = _checked_setting(os.environ.get("SAE_KERNELS_UNDER_COMPILE", "auto"),
                                  "SAE_KERNELS_UNDER_COMPILE")


def set_under_compile(setting: str) -> str:
    """Set what torch.compile and torch.export trace from now on (``UNDER_COMPILE``; the
    default is ``SAE_KERNELS_UNDER_COMPILE``'s value at import, else ``"auto"``), and return
    the previous setting. Graphs compiled under another setting are traced again at their
    next call."""
    global _under_compile
    previous, _under_compile = _under_compile, _checked_setting(setting, "the setting")
    return previous


def under_compile_setting() -> str:
    """What torch.compile and torch.export trace now (see :func:`set_under_compile`)."""
    return _under_compile


# bound once: on the hot path each attribute lookup costs about what the query does
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
_tracing = torch._C._is_tracing


def runs_composite(backend: str) -> bool:
    """Whether a call on ``backend`` runs as the operator's ATen composite
    (``reference.composite``, prologue and epilogue included) instead of the fused op.

    Under a torch.func transform (vmap, grad, jacrev, jvp, ...): yes, on every backend.
    The fused ops have no batching rule and their autograd (a C++ function on CPUs, the
    custom op's on GPUs) cannot run under a transform; the composite's ATen ops have both.

    During an ONNX export, by either exporter: yes, on every backend. The composite lowers
    to standard ONNX ops (ReduceMean, Gemm, the activations, Mul, Add), which ONNX Runtime
    fuses by itself; the fused ops have no ONNX translation.

    Under torch.compile and torch.export: the C++ CPU op yes, the Triton op no. On a CPU
    inductor generates the same two passes over x from the composite (the pool with the
    prologue folded in, the rescale with the epilogue) as vectorised loops of its own, fuses
    them with the ops around the block and plans the memory of what it computes, the FCs
    between them in one call of the C++ excitation where :func:`cpu_excitation_for` says
    so, else as addmm; the composite exports as standard ops. The op itself (laid out as
    inductor chooses, by its flexible_layout tag) is the faster in the depthwise networks' blocks
    compiled alone (it applies a SiLU or Hardswish prologue once, inductor twice), but no
    whole network measured ahead of the composite (``benchmarks/compiled_se_blocks.py --op
    [--whole]``; the README's torch.compile section). On a GPU the Triton op takes one,
    three or four launches where inductor's code for the composite takes five (a
    reduction, two GEMMs, the activation, the rescale with the gate and tail), and reads
    less of x twice from HBM: by the model of ``gpu_plan`` (``sae-kernels plan``) the op
    is the cheaper at every SE site of SE-ResNet-50 and SENetV2-ResNet-50 at N = 1-128 (all
    64 rows per GPU and pass, both layouts; 0.97-0.99 of compile's time at the closest).
    The model has not met a GPU yet, so it does not choose per call; a rule that follows it
    should wait for ``sae-kernels gpu-check``'s measurements.
    :func:`set_under_compile` (or ``SAE_KERNELS_UNDER_COMPILE``) overrides this rule (not
    the two above).

    Otherwise no. The fused modules ask on every call: an eager call pays about 0.15 us
    for the three queries (torch.func, torch.compile, a trace being recorded).
    """
    if _functorch_transforms_active():
        return True
    if _is_compiling():
        if torch.onnx.is_in_onnx_export():  # the dynamo exporter runs torch.export
            return True
        setting = under_compile_setting()
        return backend == "cpu" if setting == "auto" else setting == "composite"
    # the TorchScript exporter records a trace in eager mode; is_in_onnx_export costs 1 us,
    # so it is asked only then
    return _tracing() and torch.onnx.is_in_onnx_export()


def cpu_op_for(backend: str, x: torch.Tensor, overwrite_x: bool = False
               ) -> Callable[..., torch.Tensor] | None:
    """The C++ op's entry (``kernels.cpu.op_entry``, given ``overwrite_x``) where a call on
    ``x`` with ``backend`` runs the C++ kernels as the op, else None (the call goes by
    :func:`resolve_backend` and :func:`runs_composite`). The rules of those two for this
    one case, in the few queries a call on a small map can afford: callers that get the op
    leave the operand checks to it (it makes the same ones, in the same words)."""
    if (backend in ("auto", "cpu") and x.is_cpu and x.dtype in CPU_DTYPES
            and not runs_composite("cpu") and cpu_kernels.available()):
        return cpu_kernels.op_entry(overwrite_x)
    return None


def cpu_excitation_for(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]
                       ) -> Callable[..., torch.Tensor] | None:
    """The C++ excitation (``kernels.cpu.excitation``) for a composite on ``x`` that
    torch.compile traces under the ``"auto"`` setting on a CPU, where no gradient is due
    (none of ``tensors`` needs one, or grad mode is off); else None, and the composite
    computes its FCs as ATen ops.

    Inductor keeps the passes over x (the pool with the prologue, the rescale with the
    epilogue), fused with the ops around the block; the FCs between them become one call
    of ``sae_kernels::cpu_excite`` instead of two ``addmm`` and two elementwise kernels,
    which read the weights that the network's other layers pushed out of cache at a half
    to a third of the speed of the C++ loops (every SE site's excitation at N = 1, cold:
    EfficientNet-B0 1.05 ms against 0.54 ms, SENetV2-ResNet-50 2.36 ms against 0.88 ms;
    ``benchmarks/excitation_cost.py``); timed in place in the compiled networks, the
    excitation is 1.6-5.5x faster than the original's 1x1 convolutions at every SE site
    of the seven measured (``benchmarks/compiled_se_sites.py``). Not under torch.export
    (a saved program of standard ops needs no library to run), an ONNX export or a
    torch.func transform, nor where a gradient is due (the C++ excitation has no
    autograd; the composite's ATen FCs do)."""
    if not (_is_compiling() and _under_compile == "auto" and x.is_cpu
            and x.dtype in CPU_DTYPES and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export() and not _functorch_transforms_active()
            and cpu_kernels.available()):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    return cpu_kernels.excitation


def may_reuse_computed_tensors() -> bool:
    """Whether a module may reuse tensors it computed from its parameters on an earlier call
    (stacked branch weights, a BatchNorm's scale and shift): not while torch.compile,
    torch.export or torch.jit.trace records a graph (the tensor would become one of its
    constants), nor under a torch.func transform (the parameters may be batched)."""
    return not (_is_compiling() or _tracing() or _functorch_transforms_active())
