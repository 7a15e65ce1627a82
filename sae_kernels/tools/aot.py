"""Compile every Triton kernel configuration the dispatcher can choose, ahead of time.

Triton compiles for a GPU it cannot see (``triton.compile`` with a ``GPUTarget``), so
this proves on a machine without a GPU that each kernel lowers to a cubin for sm_80 and
sm_90a, and reads its registers, stack (spills) and shared memory from
``cuobjdump --dump-resource-usage``. Must run where ``TRITON_INTERPRET`` is not "1"
when triton is first imported.
"""

import dataclasses
import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..dispatch import H100, LaunchPlan, plan_launch
from ..kernels import sae_triton
from ..options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS
from ..sites import resnet50_sites

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
           torch.float64: "fp64"}
#: (C, H*W, K) of the SE sites of SE-ResNet-50 / SENetV2-ResNet-50, plus odd shapes.
SHAPES = [(s.channels, s.size**2, s.stacked_width) for s in resnet50_sites()] + [
    (3, 1, 1), (19, 221, 8), (228, 49, 228)]


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    layout: str
    constexprs: tuple
    #: ptxas's register limit (``LaunchPlan.max_registers``)
    max_registers: int | None = None

    def describe(self) -> str:
        flags = " ".join(f"{k}={v}" for k, v in self.constexprs)
        limit = f" maxnreg={self.max_registers}" if self.max_registers is not None else ""
        return f"{self.kernel} {self.dtype} {self.layout} {flags}{limit}"


@dataclasses.dataclass
class Report:
    variant: Variant
    target: str
    registers: int = -1
    stack: int = -1
    shared: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.stack == 0


def _signature(fn, dtype: str, layout: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton types of each argument; unit strides are specialised as Triton does at launch."""
    unit_stride = {"nchw": "_shw", "channels_last": "_sc"}[layout]
    accumulate = "fp64" if dtype == "fp64" else "fp32"
    small = {"z_ptr", "p_ptr", "u_ptr", "du_ptr", "dp_ptr", "dz_ptr", "slots_ptr", "prologue_ptr",
             "d_prologue_ptr"}
    signature, constants = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "counter_ptr":
            signature[name] = "*i32"
        elif name in small:
            signature[name] = f"*{accumulate}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name.endswith(unit_stride) and name not in ("w1_sc", "w2_sc"):
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    return signature, constants


#: The constexprs of a kernel without the prologue.
NO_PROLOGUE = dict(HAS_PROLOGUE=False, PROLOGUE_ACT=0)


def _per_kernel(plan: LaunchPlan, act: int, gate: int, has_fc2: bool,
                prologue: dict) -> list[tuple[str, dict]]:
    """Each kernel's constexprs for one configuration, with every epilogue flag on; with a
    prologue, the dx kernel with and without the prologue's gradients."""
    tiles = dict(BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw)
    flags = dict(ACT=act, HAS_FC2=has_fc2, BLOCK_K=plan.block_k, BLOCK_FC=plan.block_fc, **tiles)
    epilogue = dict(GATE=gate, RESIDUAL=True, RELU_OUT=True)
    dx = dict(**epilogue, WRITE_D_IDENTITY=True, **tiles)
    per_kernel = [
        ("sae_forward_single_kernel", dict(**flags, **epilogue, HAS_IDENTITY=True, HAS_B1=True,
                                           HAS_B2=has_fc2)),
        ("sae_forward_pool_kernel", dict(**flags, HAS_B1=True, HAS_B2=has_fc2)),
        ("sae_forward_rescale_kernel", dict(**epilogue, HAS_IDENTITY=True, **tiles)),
        ("sae_backward_reduce_kernel", dict(**flags, GATE=gate, RELU_OUT=True)),
        ("sae_backward_dx_kernel", dict(dx, PROLOGUE_GRADS=False)),
    ]
    if prologue["HAS_PROLOGUE"]:
        per_kernel.append(("sae_backward_dx_kernel", dict(dx, PROLOGUE_GRADS=True)))
    return [(kernel, {**constexprs, **prologue}) for kernel, constexprs in per_kernel]


def variants() -> Iterator[tuple[Variant, int]]:
    """Every (kernel, dtype, layout, tiles) the GPU dispatcher picks for SHAPES with every
    epilogue flag on: in the two-FC and the single-FC form, and with a silu prologue; plus
    each (act, gate) pair and each prologue act once per kernel (fp32, NCHW)."""
    every_code = list(itertools.product(range(len(ACTIVATIONS)), range(len(GATES))))
    seen = set()
    for i, ((c, hw, k), layout, dtype) in enumerate(
            itertools.product(SHAPES, ("nchw", "channels_last"), _DTYPES)):
        first = i == 0 and dtype == torch.float32
        codes = every_code if first else [(len(ACTIVATIONS) - 1, 0)]
        prologue_acts = (range(len(PROLOGUE_ACTIVATIONS)) if first
                         else [PROLOGUE_ACTIVATIONS.index("silu")])
        # (act, gate, has_fc2, prologue): each code; then with the last one the single-FC
        # form (no fc2, K = C) and the prologues
        configs = [(act, gate, True, NO_PROLOGUE) for act, gate in codes]
        configs.append((*codes[-1], False, NO_PROLOGUE))
        configs += [(*codes[-1], True, dict(HAS_PROLOGUE=True, PROLOGUE_ACT=p))
                    for p in prologue_acts]
        for act, gate, has_fc2, prologue in configs:
            plan = plan_launch(1, c, hw, k if has_fc2 else c, dtype.itemsize,
                               layout == "channels_last", torch.device("cpu"), "single",
                               profile=H100, prologue=prologue["HAS_PROLOGUE"])
            for kernel, constexprs in _per_kernel(plan, act, gate, has_fc2, prologue):
                v = Variant(kernel, _DTYPES[dtype], layout, tuple(sorted(constexprs.items())),
                            plan.max_registers)
                if v not in seen:
                    seen.add(v)
                    yield v, plan.num_warps


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", out)}
    return fields["REG"], fields["STACK"], fields["SHARED"]


def compile_variant(variant: Variant, target: str, num_warps: int = 4) -> Report:
    report = Report(variant, target)
    fn = getattr(sae_triton, variant.kernel)
    signature, constants = _signature(fn, variant.dtype, variant.layout, dict(variant.constexprs))
    try:
        options = {"num_warps": num_warps}
        if variant.max_registers is not None:
            options["maxnreg"] = variant.max_registers
        compiled = triton.compile(ASTSource(fn, signature, constants), target=TARGETS[target],
                                  options=options)
        report.registers, report.stack, report.shared = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a compile failure is a finding to report, not a crash
        while e.__cause__ is not None:
            e = e.__cause__
        report.error = f"{type(e).__name__}: {e}"
    return report


def compile_all(targets: Iterable[str] = TARGETS) -> list[Report]:
    if sae_triton.INTERPRETED:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset when "
                           "triton is imported")
    return [compile_variant(v, t, warps) for t in targets for v, warps in variants()]
