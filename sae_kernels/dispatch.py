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

Triton strategies (kernels in ``kernels/sae_triton.py``):
    ``"single"``  one launch, one program per sample;
    ``"split"``   two launches, pooling spread over (sample, channel block, HW chunk).
    ``"auto"``    the cheaper of the two by the cost model in :func:`estimate_seconds`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .kernels import cpu as cpu_kernels

BACKENDS = ("auto", "cpu", "triton", "reference")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
STRATEGIES = ("auto", "single", "split")

#: Tile of the excitation GEMVs, (BLOCK_K, BLOCK_FC) = at most 64 x 64 (32 x 64 in fp64).
MAX_FC_BLOCK = 64
#: The split grids aim at this many programs per SM.
PROGRAMS_PER_SM = 4

# Cost model constants (seconds, bytes/second). Estimates for A100/H100-class GPUs:
# a launch costs a few microseconds, one program streams at a fraction of the device
# bandwidth, the whole device at ~2 TB/s. Both strategies move x twice and y once.
LAUNCH_SECONDS = 4e-6
PROGRAM_BYTES_PER_SECOND = 100e9
DEVICE_BYTES_PER_SECOND = 2e12


@dataclass(frozen=True)
class DeviceProfile:
    """What the tile and grid choice needs to know about the device."""

    sms: int
    #: Elements of x in one program's tile (BLOCK_C * BLOCK_HW).
    tile_elements: int
    #: Largest tile side along the contiguous axis (HW for NCHW, C for channels_last).
    max_contiguous_block: int
    #: L2 cache size, for the bytes-moved model (``cost.gpu_dram_bytes``).
    l2_bytes: int = 0


#: 4096-element tiles are 32 fp32 values per thread at 4 warps, the size that kept the
#: single-launch kernel free of spills.
GPU_TILE_ELEMENTS = 4096
GPU_MAX_CONTIGUOUS_BLOCK = 256
#: Triton's interpreter runs programs one after another and pays per tile step, so CPU
#: tensors get large tiles and a small grid. The kernels are the same; odd shapes still
#: exercise every mask, every multi-block loop and multi-chunk grid.
INTERPRETER_PROFILE = DeviceProfile(sms=2, tile_elements=32768, max_contiguous_block=1024)


#: The register limit of the prologue's kernels: all a thread can have. Without a limit,
#: ptxas gives some of them 64 or 80 registers and spills a few bytes (for occupancy);
#: with one it allocates what they need, spill-free.
PROLOGUE_MAX_REGISTERS = 255


#: The GPU planned for where none is present (reports, ahead-of-time compilation): an H100 SXM.
H100 = DeviceProfile(132, GPU_TILE_ELEMENTS, GPU_MAX_CONTIGUOUS_BLOCK, l2_bytes=50 << 20)


def device_profile(device: torch.device) -> DeviceProfile:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceProfile(props.multi_processor_count, GPU_TILE_ELEMENTS,
                             GPU_MAX_CONTIGUOUS_BLOCK, props.L2_cache_size)
    return INTERPRETER_PROFILE


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


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and grid shape for one (shape, layout, strategy)."""

    strategy: str
    block_c: int
    block_hw: int
    block_k: int
    block_fc: int
    #: HW elements per program of the split grids (pool, rescale, backward).
    hw_chunk: int
    num_warps: int
    #: ptxas's limit on registers per thread (``maxnreg``); None leaves the choice to ptxas.
    max_registers: int | None = None

    def hw_chunks(self, hw: int) -> int:
        return triton_cdiv(hw, self.hw_chunk)

    def launch_options(self) -> dict:
        """The compile options of a launch: the warps, and the register limit when set."""
        if self.max_registers is None:
            return dict(num_warps=self.num_warps)
        return dict(num_warps=self.num_warps, maxnreg=self.max_registers)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def estimate_seconds(strategy: str, n: int, sample_bytes: int, sms: int) -> float:
    """Cost model: launches plus the traffic over the bandwidth each strategy can use.

    ``single`` runs one program per sample: ceil(N / SMs) waves, each streaming one
    sample at a single program's bandwidth, and never faster than the device allows.
    ``split`` spreads every sample over the device but pays a second launch.
    """
    traffic = 3 * sample_bytes
    device_bound = n * traffic / DEVICE_BYTES_PER_SECOND
    if strategy == "single":
        waves = math.ceil(n / sms) * traffic / PROGRAM_BYTES_PER_SECOND
        return LAUNCH_SECONDS + max(waves, device_bound)
    return 2 * LAUNCH_SECONDS + device_bound


def plan_launch(
    n: int, c: int, hw: int, k: int, element_size: int, channels_last: bool,
    device: torch.device, strategy: str = "auto", profile: DeviceProfile | None = None,
    prologue: bool = False,
) -> LaunchPlan:
    """Tiles follow the contiguous axis; the strategy follows the cost model.

    ``profile`` overrides the device's (to plan for a GPU from a machine without one);
    ``prologue``: the kernels apply the operator's prologue to x.
    """
    check_strategy(strategy)
    profile = profile or device_profile(device)
    # fp64 accumulates in fp64, and the prologue keeps more values live per element (its
    # backward a second input stream and two sums): each halves the elements per tile,
    # which keeps the registers per thread
    wide = element_size == 8
    tile_elements = profile.tile_elements // (2 if wide else 1) // (2 if prologue else 1)
    if channels_last:
        block_c = min(_pow2(c), profile.max_contiguous_block)
        block_hw = min(_pow2(hw), max(1, tile_elements // block_c))
    else:
        block_hw = min(_pow2(hw), profile.max_contiguous_block)
        block_c = min(_pow2(c), max(1, tile_elements // block_hw))
    if strategy == "auto":
        sample_bytes = c * hw * element_size
        strategy = min(("single", "split"),
                       key=lambda s: estimate_seconds(s, n, sample_bytes, profile.sms))
    programs_per_chunk = max(1, n * triton_cdiv(c, block_c))
    chunks = max(1, min(triton_cdiv(hw, block_hw),
                        triton_cdiv(PROGRAMS_PER_SM * profile.sms, programs_per_chunk)))
    hw_chunk = triton_cdiv(triton_cdiv(hw, chunks), block_hw) * block_hw
    return LaunchPlan(
        strategy=strategy,
        block_c=block_c,
        block_hw=block_hw,
        block_k=min(_pow2(k), MAX_FC_BLOCK // 2 if wide else MAX_FC_BLOCK),
        block_fc=min(_pow2(c), MAX_FC_BLOCK),
        hw_chunk=hw_chunk,
        num_warps=8 if block_c * block_hw >= min(tile_elements, GPU_TILE_ELEMENTS) else 4,
        max_registers=PROLOGUE_MAX_REGISTERS if prologue else None,
    )


#: What torch.compile and torch.export trace (``SAE_KERNELS_UNDER_COMPILE``): ``"auto"``
#: (the rule of :func:`runs_composite`), ``"op"`` (the fused op) or ``"composite"`` (the
#: ATen composite).
UNDER_COMPILE = ("auto", "op", "composite")


def under_compile_setting() -> str:
    setting = os.environ.get("SAE_KERNELS_UNDER_COMPILE", "auto")
    if setting not in UNDER_COMPILE:
        raise ValueError(f"SAE_KERNELS_UNDER_COMPILE must be one of {', '.join(UNDER_COMPILE)}, "
                         f"got {setting!r}")
    return setting


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
    them with the ops around the block, and runs the FCs as addmm; an opaque op would split
    its fusion groups and cost a dispatch per call. Measured in the README (torch.compile
    section). On a GPU the Triton op moves the same bytes in one or two launches where the
    composite takes five or more (a reduction, two GEMMs, the act and gate kernels, the
    rescale) and the neighbours it absorbs (prologue, shortcut and ReLU) are in it: by the
    bytes-and-launches model of ``cost.py`` the op is the cheaper (a model, until a GPU
    measures it). ``SAE_KERNELS_UNDER_COMPILE`` overrides this rule (not the two above).

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


def may_reuse_computed_tensors() -> bool:
    """Whether a module may reuse tensors it computed from its parameters on an earlier call
    (stacked branch weights, a BatchNorm's scale and shift): not while torch.compile,
    torch.export or torch.jit.trace records a graph (the tensor would become one of its
    constants), nor under a torch.func transform (the parameters may be batched)."""
    return not (_is_compiling() or _tracing() or _functorch_transforms_active())
