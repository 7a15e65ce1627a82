"""Compile every Triton kernel launch the host code makes, ahead of time.

The report builds what really runs. It calls the host functions ``sae_triton.forward``
and ``sae_triton.backward`` on CPU tensors, planned for each GPU of ``gpu_plan.GPUS``
under each strategy, with every kernel of ``sae_triton`` swapped for a recorder: the
launches carry the host code's own kernels, arguments, constexprs and launch options.
Triton's launcher code then derives from those argument values what a launch on a GPU
compiles: the signature (pointer dtypes, i32 or i64 integers), the divisibility hints on
16-byte aligned pointers and on integers divisible by 16, and integers equal to 1 made
constants. Launches that derive the same build are compiled once.

Each build is compiled with ``triton.compile`` for a ``GPUTarget`` (sm_80, sm_90; no
GPU needed). Its registers and stack (spills) are read with the ``cuobjdump
--dump-resource-usage`` that ships with triton; its shared memory is what Triton launches
it with (``metadata.shared``), which must let as many programs onto an SM of the target's
GPU as the model counts.

The specialisation needs triton >= 3.5, whose launcher specialises through
``create_function_from_signature`` and ``JITFunction._pack_args``, and TRITON_INTERPRET
unset when triton is first imported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.errors import CompilationError
from triton.runtime.jit import JITFunction, create_function_from_signature

from .. import dispatch, gpu_plan
from ..kernels import sae_triton
from ..options import ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS
from ..sites import resnet50_sites

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
#: The GPU of each target, whose SM a build's shared memory must fit as the model counts.
TARGET_GPUS = {"sm_80": gpu_plan.A100, "sm_90": gpu_plan.H100}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
#: (C, H, W, K) of the SE sites of SE-ResNet-50 / SENetV2-ResNet-50, a last site with
#: K = C (FCs that wide get FC2 a launch of its own), and odd shapes.
SHAPES = [(s.channels, s.size, s.size, s.stacked_width) for s in resnet50_sites()] + [
    (2048, 7, 7, 2048), (3, 1, 1, 1), (19, 13, 17, 8), (228, 7, 7, 228)]
#: One sample and a batch: the model picks ``single`` for some shapes and ``split`` for
#: others, and the split plans' grids, tiles and sample groups depend on the batch.
BATCH_SIZES = (1, 128)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` of the host code."""

    kernel: str
    args: tuple
    #: the kernel's parameters passed by keyword: the constexprs
    kwargs: dict
    #: the rest of the keywords: num_warps, maxnreg, num_stages, ...
    options: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch and runs nothing."""

    def __init__(self, name: str, fn: JITFunction, launches: list[Launch]):
        self.name, self.params, self.launches = name, set(fn.arg_names), launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(
                self.name, args, {k: v for k, v in kwargs.items() if k in self.params},
                {k: v for k, v in kwargs.items() if k not in self.params}))
        return launch


@contextlib.contextmanager
def recording(gpu: gpu_plan.GpuSpec = gpu_plan.H100) -> Iterator[list[Launch]]:
    """Within: every kernel of ``sae_triton`` records its launches into the yielded list
    instead of running, and the host code plans for ``gpu``."""
    kernels = {name: fn for name, fn in vars(sae_triton).items() if isinstance(fn, JITFunction)}
    launches: list[Launch] = []
    device_spec = gpu_plan.device_spec
    try:
        for name, fn in kernels.items():
            setattr(sae_triton, name, _Recorder(name, fn, launches))
        gpu_plan.device_spec = lambda device: gpu
        yield launches
    finally:
        gpu_plan.device_spec = device_spec
        for name, fn in kernels.items():
            setattr(sae_triton, name, fn)


@dataclasses.dataclass
class Build:
    """One compilation: a kernel with what Triton's launcher derives from a launch
    (signature, constants and attributes by argument path, parsed options) for a target."""

    kernel: str
    target: str
    signature: dict[str, str]
    constexprs: dict[tuple, object]
    attrs: dict[tuple, list]
    options: dict
    #: the options the host code set (num_warps, maxnreg, ...)
    launch_options: dict
    #: the configuration that first launched it
    where: str = ""

    @property
    def key(self) -> str:
        """Equal for launches that compile to the same binary."""
        return repr((self.kernel, self.target, self.signature, self.constexprs, self.attrs,
                     self.options))

    def _name(self, path: tuple) -> str:
        return list(self.signature)[path[0]] + "".join(f"[{i}]" for i in path[1:])

    @property
    def divisible_by_16(self) -> list[str]:
        """The arguments Triton assumes divisible by 16 (pointers: 16-byte aligned)."""
        return [self._name(path) for path, attrs in self.attrs.items()
                if ["tt.divisibility", 16] in attrs]

    def _constants(self, declared: bool) -> dict[str, object]:
        params = _kernel(self.kernel).params
        return {self._name(path): value for path, value in self.constexprs.items()
                if params[path[0]].is_constexpr == declared}

    @property
    def flags(self) -> dict[str, object]:
        """The kernel's constexprs."""
        return self._constants(declared=True)

    @property
    def specialised(self) -> dict[str, object]:
        """The other arguments compiled in as constants: the integers equal to 1."""
        return self._constants(declared=False)

    def describe(self) -> str:
        divisible = set(self.divisible_by_16)
        others = [name for name, ty in self.signature.items()
                  if ty != "constexpr" and name not in divisible]
        return " | ".join([
            f"{self.kernel} {self.where}",
            " ".join(f"{k}={v}" for k, v in {**self.launch_options, **self.flags}.items()),
            f"div16: all{' but ' + ','.join(others) if others else ''}",
            "=1: " + (",".join(self.specialised) or "-"),
        ])


def operator_kernels() -> set[str]:
    """The kernels of ``sae_triton``: its own public jit functions (its device functions
    are private)."""
    return {name for name, fn in vars(sae_triton).items() if isinstance(fn, JITFunction)
            and fn.module == sae_triton.__name__ and not name.startswith("_")}


def _kernel(name: str) -> JITFunction:
    return getattr(sae_triton, name)


@functools.cache
def _backend(target: str):
    return make_backend(TARGETS[target])


@functools.cache
def _binder(kernel: str, target: str) -> Callable:
    fn = _kernel(kernel)
    return create_function_from_signature(fn.signature, fn.params, _backend(target))


def specialise(launch: Launch, target: str, where: str = "") -> Build:
    """What ``JITFunction.run`` would compile for ``launch`` on ``target``."""
    fn, backend = _kernel(launch.kernel), _backend(target)
    kwargs = {**launch.kwargs, **launch.options}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as run() does
    bound_args, specialization, options = _binder(launch.kernel, target)(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return Build(launch.kernel, target, signature, constexprs, attrs, options.__dict__,
                 launch.options, where)


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the operator, every epilogue flag on (identity, residual,
    ReLU tail), weights and biases in x's dtype; ``single_fc``: fc2_weight=None, K = C;
    ``prologue_act``: a prologue with scale, shift and that activation."""

    n: int
    c: int
    h: int
    w: int
    k: int
    layout: str
    dtype: str
    act: str
    gate: str
    single_fc: bool = False
    prologue_act: str | None = None

    def __str__(self) -> str:
        return (f"{self.dtype} {self.layout} N={self.n} C={self.c} {self.h}x{self.w} "
                f"K={self.c if self.single_fc else self.k}")

    def run(self, strategy: str) -> None:
        """The forward under ``strategy``, for inference and as training runs it (writing
        the ReLU mask), then the backward on its outputs (with and without the prologue's
        gradients under a prologue)."""
        dtype = DTYPES[self.dtype]
        k = self.c if self.single_fc else self.k
        x = torch.empty((self.n, self.c, self.h, self.w), dtype=dtype,
                        memory_format=LAYOUTS[self.layout])
        identity = torch.empty_like(x)
        fc1_weight, fc1_bias = x.new_empty((k, self.c)), x.new_empty(k)
        fc2_weight, fc2_bias = ((None, None) if self.single_fc
                                else (x.new_empty((self.c, k)), x.new_empty(self.c)))
        prologue = ((None, None, "none") if self.prologue_act is None
                    else (x.new_empty(self.c), x.new_empty(self.c), self.prologue_act))
        operands = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, identity, self.act,
                    self.gate, True, "relu", strategy, *prologue)
        sae_triton.forward(*operands)  # inference: no mask
        y, _, p, u, mask = sae_triton.forward(*operands, save_relu_mask=True)
        grad = torch.empty_like(y)
        for prologue_grads in (False, True) if self.prologue_act is not None else (False,):
            sae_triton.backward(grad, x, mask, fc1_weight, fc2_weight, p, u, self.act, self.gate,
                                True, "relu", True, *prologue, prologue_grads)


def cases(dtypes: Iterable[str] = DTYPES) -> Iterator[Case]:
    """Each shape, layout, dtype and batch size, in the two-FC form, the single-FC form and
    with a silu prologue; every (act, gate) pair and every prologue activation once (the
    first shape, layout and dtype)."""
    every_code = list(itertools.product(ACTIVATIONS, GATES))
    for i, ((c, h, w, k), layout, dtype) in enumerate(
            itertools.product(SHAPES, LAYOUTS, dtypes)):
        first = i == 0
        codes = every_code if first else [(ACTIVATIONS[-1], GATES[0])]
        prologue_acts = PROLOGUE_ACTIVATIONS if first else ["silu"]
        for n in BATCH_SIZES:
            shape = (n, c, h, w, k, layout, dtype)
            yield from (Case(*shape, act, gate) for act, gate in codes)
            yield Case(*shape, *codes[-1], single_fc=True)
            yield from (Case(*shape, *codes[-1], prologue_act=p) for p in prologue_acts)


def host_calls(dtypes: Iterable[str] = DTYPES) -> Iterator[tuple[str, Callable[[], object]]]:
    """Every call of the host code the report builds for, labelled: each case under each
    strategy of ``dispatch.STRATEGIES``."""
    for case in cases(dtypes):
        for strategy in dispatch.STRATEGIES:
            yield f"{case} {strategy}", functools.partial(case.run, strategy)


def builds(targets: Iterable[str] = TARGETS,
           gpus: Iterable[gpu_plan.GpuSpec] = gpu_plan.GPUS.values(),
           dtypes: Iterable[str] = DTYPES) -> list[Build]:
    """The distinct builds of the launches of every host call in ``dtypes``, planned for
    each of ``gpus``, in the order first launched."""
    found: dict[str, Build] = {}
    seen: set[tuple] = set()  # launches already specialised (a sample group's repeat, ...)
    for gpu, (where, call) in itertools.product(gpus, host_calls(dtypes)):
        with recording(gpu) as launches:
            call()
        for launch, target in itertools.product(launches, targets):
            if (_launch_key(launch), target) in seen:
                continue
            seen.add((_launch_key(launch), target))
            build = specialise(launch, target, f"{where} ({gpu.name})")
            found.setdefault(build.key, build)
    return sorted(found.values(), key=lambda b: list(TARGETS).index(b.target))


def _launch_key(launch: Launch) -> tuple:
    """Equal for launches that specialise alike: what Triton's launcher reads of each
    argument (a tensor's dtype and 16-byte alignment, any other value as it is)."""
    args = tuple((str(a.dtype), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a
                 for a in launch.args)
    return (launch.kernel, args, tuple(launch.kwargs.items()), tuple(launch.options.items()))


@dataclasses.dataclass
class Report:
    """A build's registers and stack per thread, its shared memory per program (what Triton
    launches it with), whether its loop is software-pipelined (FC builds with a loop; None
    for the others), or why it failed."""

    build: Build
    registers: int = -1
    stack: int = -1
    shared: int = -1
    pipelined: bool | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.stack == 0


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", out)}
    return fields["REG"], fields["STACK"]


def _residency(build: Build, shared: int) -> str:
    """Where the build's shared memory lets fewer of its programs onto an SM of the
    target's GPU than the model counts (:func:`gpu_plan.resident_programs`, by warps and
    register limit), what it holds; else ""."""
    spec = TARGET_GPUS[build.target]
    modelled = gpu_plan.resident_programs(spec, build.options["num_warps"],
                                          build.launch_options.get("maxnreg",
                                                                   gpu_plan.MAX_REGISTERS))
    fits = gpu_plan.shared_resident_programs(spec, shared)
    if fits >= modelled:
        return ""
    return (f"{shared} bytes of shared memory: {fits} programs per SM of an {spec.name}, "
            f"the model counts {modelled}")


#: The batched FC kernels, by the names the model gives their launches.
FC_KERNELS = {f"sae_{name}_kernel": name
              for name in ("fc1", "fc2", "fc2_backward", "fc1_backward")}


def _pipelining(build: Build, ttgir: str) -> tuple[bool | None, str]:
    """(Whether an FC build's loop is software-pipelined: async copies in its TTGIR, None
    for other builds and loop-free ones; a mismatch with what the model credits, or "")."""
    if build.kernel not in FC_KERNELS or "scf.for" not in ttgir:
        return None, ""
    pipelined = "async_copy_global_to_local" in ttgir
    modelled = gpu_plan.fc_pipelined(FC_KERNELS[build.kernel],
                                     build.flags.get("HAS_FC2") is False,
                                     build.specialised.get("chunks") == 1)
    if pipelined == modelled:
        return pipelined, ""
    return pipelined, (f"loop {'' if pipelined else 'not '}pipelined, the model "
                       f"(gpu_plan.fc_pipelined) says {'' if modelled else 'not '}pipelined")


def compile_build(build: Build) -> Report:
    """Compile ``build`` as ``JITFunction.run`` would; read its resource usage and check its
    pipelining and the programs its shared memory lets onto an SM against the model."""
    report = Report(build)
    source = ASTSource(_kernel(build.kernel), build.signature, build.constexprs, build.attrs)
    try:
        compiled = triton.compile(source, target=TARGETS[build.target], options=build.options)
        report.registers, report.stack = _resource_usage(compiled.asm["cubin"])
        report.shared = compiled.metadata.shared
        report.pipelined, report.error = _pipelining(build, compiled.asm["ttgir"])
        report.error = report.error or _residency(build, report.shared)
    except Exception as e:  # a compile failure is a finding to report, not a crash
        report.error = _failure(e)
    return report


def _failure(e: BaseException) -> str:
    """The innermost cause of a compile failure, and where in the kernels it arose."""
    where = ""
    while e.__cause__ is not None:
        if isinstance(e, CompilationError):
            where = " ".join(str(e).splitlines()[:2])
        e = e.__cause__
    message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return message + (f" ({where})" if where else "")


def compile_all(targets: Iterable[str] = TARGETS,
                gpus: Iterable[gpu_plan.GpuSpec] = gpu_plan.GPUS.values(),
                dtypes: Iterable[str] = DTYPES) -> Iterator[Report]:
    """Each build of :func:`builds`, compiled, in order; one thread per core, as much of a
    build's time is spent in ptxas."""
    if sae_triton.INTERPRETED:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset when "
                           "triton is imported")
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        yield from pool.map(compile_build, builds(targets, gpus, dtypes))
