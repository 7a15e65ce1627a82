"""The C++ CPU kernels in csrc/: the ops defined at import, the library built on first use.

At import the ops of ``csrc/schemas.h`` are defined with their fake kernels
(``cpu_reference``), so that saved exports, traces and AOTInductor packages find them
in a fresh process. A library built for these sources and this torch is loaded at once
(milliseconds). Otherwise PyTorch stand-ins hold the ops' place: the first call builds
the library (about half a minute, once) and loads it, or, where that fails, the stand-ins
compute the ops themselves after a warning. Beside the library a small Python module is
built, the typed entry that eager callers reach ``cpu_sae`` through (:func:`op_entry`).

Builds are cached under ``SAE_KERNELS_BUILD_DIR`` (default ``~/.cache/sae_kernels``) in a
directory named after torch's version and a digest of the sources and flags;
``python -m sae_kernels build`` builds ahead of time and prints the library's path (a C++
program serving a saved graph loads that library: README, Deploying).

Environment switches:
    SAE_KERNELS_NO_CPU_EXTENSION=1   never build or load the library (stand-ins only)
    SAE_KERNELS_BUILD_DIR=DIR        where builds are cached
    SAE_KERNELS_CPU_ISA=avx512|avx2|generic   force an instruction set (default: the best)
    SAE_KERNELS_CPU_CHUNK_BYTES=N    bytes of x per chunk kept in cache between passes
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import flops
from ..options import ACTIVATIONS, GATES, fc1_parts
from . import cpu_reference


def _find_sources() -> Path:
    """csrc/ inside the installed package (a wheel), else beside it (a checkout)."""
    package = Path(__file__).resolve().parents[1]
    inside = package / "csrc"
    return inside if inside.is_dir() else package.parent / "csrc"


CSRC = _find_sources()
SOURCES = ("forward.cpp", "backward.cpp", "excite.cpp", "register.cpp", "kernels_avx512.cpp",
           "kernels_avx2.cpp", "kernels_generic.cpp")
#: -fno-trapping-math: without it GCC keeps every clamp and select before a division or an
#: exp as a branch, and on AVX2 (no mask registers) the loops holding them, the SiLU and
#: sigmoid ones among them, stay scalar: 3-4x slower. It changes no value, only whether
#: floating-point exception flags may be raised speculatively.
FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LIBRARY_NAME = "sae_kernels_cpu"
#: the typed Python entry to cpu_sae (csrc/python_entry.cpp), a Python module built beside
#: the library (which itself must load without Python)
ENTRY_SOURCE = "python_entry.cpp"
ENTRY_NAME = "sae_kernels_entry"


def source_digest() -> str:
    """A digest of everything the library is built from: sources, headers, flags, torch."""
    digest = hashlib.sha256(f"{torch.__version__} {' '.join(FLAGS)}".encode())
    for path in sorted(CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    root = Path(os.environ.get("SAE_KERNELS_BUILD_DIR", Path.home() / ".cache" / "sae_kernels"))
    return root / f"torch-{torch.__version__.replace('+', '_')}-{source_digest()}"


def library_path() -> Path:
    """Where the library built from these sources is (or will be)."""
    return build_dir() / f"{LIBRARY_NAME}.so"


def entry_path() -> Path:
    """Where the typed Python entry built from these sources is (or will be)."""
    return build_dir() / "entry" / f"{ENTRY_NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile the library and its Python entry unless cached, load them; the library's
    path. Raises on failure (of the library: without the entry, calls go through
    torch.ops, after a warning)."""
    global _available
    library = library_path()
    if _available:
        return library
    _retire_stand_ins()  # the library registers its own kernels in their place
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            _compile(LIBRARY_NAME, SOURCES, library.parent, verbose, python_module=False)
    except Exception:
        _install_stand_ins()
        raise
    _available = True
    _load_entry(verbose)
    return library


def _compile(name: str, sources: tuple[str, ...], directory: Path, verbose: bool,
             python_module: bool):
    """Build (and load) one target of csrc/ into `directory`."""
    from torch.utils.cpp_extension import load

    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found in {CSRC}: {', '.join(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"sae_kernels: building {name} (once; cached in {directory}) ...",
          end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        return load(name=name, sources=[str(CSRC / s) for s in sources],
                    extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), is_python_module=python_module,
                    verbose=verbose)
    finally:
        print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


# the typed entry's cpu_sae and cpu_sae_over_x, once loaded
_entry = _entry_over_x = None


def _load_entry(verbose: bool) -> None:
    global _entry, _entry_over_x
    path = entry_path()
    try:
        if path.exists():
            spec = importlib.util.spec_from_file_location(ENTRY_NAME, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = _compile(ENTRY_NAME, (ENTRY_SOURCE,), path.parent, verbose,
                              python_module=True)
    except Exception as e:
        warnings.warn(f"sae_kernels: the typed entry to the CPU op is unavailable "
                      f"({type(e).__name__}); calls go through torch.ops, ~3 us slower",
                      RuntimeWarning, stacklevel=3)
        return
    _entry, _entry_over_x = module.cpu_sae, module.cpu_sae_over_x


def op_entry(overwrite_x: bool = False):
    """What eager code calls ``sae_kernels::cpu_sae`` through: the typed entry
    (csrc/python_entry.cpp, the same dispatcher call with ~3 us less argument parsing)
    where it is loaded and nothing compiles the caller, else ``torch.ops``.

    ``overwrite_x``: the caller's x is a temporary that nothing reads after the call, so
    the entry may write y over it (``cpu_sae_``, returning x) where no gradient is recorded,
    x is dense and the shortcut is not x; otherwise it calls ``cpu_sae``."""
    if _entry is None or torch.compiler.is_compiling():
        return torch.ops.sae_kernels.cpu_sae
    return _entry_over_x if overwrite_x else _entry


_available: bool | None = None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the CPU kernels are loaded, building them on the first call."""
    global _available
    if _available is None:
        _available = _build_or_warn()
    return _available


def _build_or_warn() -> bool:
    if os.environ.get("SAE_KERNELS_NO_CPU_EXTENSION") == "1":
        return False
    try:
        build()
    except Exception as e:  # no compiler, a failed build: fall back, loudly
        warnings.warn(f"sae_kernels: the C++ CPU kernels are unavailable ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); CPU "
                      "tensors use the PyTorch reference path", RuntimeWarning, stacklevel=4)
        return False
    return True


def isa() -> str:
    """The instruction set the loaded kernels run with."""
    return torch.ops.sae_kernels.cpu_isa()


def excitation(z: torch.Tensor, fc1_weight, fc1_bias, fc2_weight: torch.Tensor | None,
               fc2_bias: torch.Tensor | None, act: str, gate: str) -> torch.Tensor:
    """``reference.excitation`` by the C++ kernels (``sae_kernels::cpu_excite``), the
    weights read in place (the branch matrices as they are)."""
    return torch.ops.sae_kernels.cpu_excite(z, fc1_parts(fc1_weight), fc1_parts(fc1_bias) or [],
                                            fc2_weight, fc2_bias, ACTIVATIONS.index(act),
                                            GATES.index(gate))


def composite_decompositions() -> dict:
    """``sae_kernels::cpu_sae`` as ATen ops (its stand-in), a table for
    ``ExportedProgram.run_decompositions``.

    A program exported while the op was traced as itself (``set_under_compile("op")``)
    holds calls that ONNX and other ATen-only consumers cannot take;
    ``program.run_decompositions(composite_decompositions())`` replaces each. Exporting the
    model itself needs none of this: an ONNX export traces the composite
    (``dispatch.runs_composite``).
    """
    return {torch.ops.sae_kernels.cpu_sae.default: cpu_reference.sae}


def schemas() -> list[str]:
    """The ops' schemas, as csrc/schemas.h states them."""
    text = (CSRC / "schemas.h").read_text()
    return ["".join(re.findall(r'"([^"]*)"', body))
            for body in re.findall(r'^SAE_SCHEMA\(((?:\s*"[^"]*")+)\s*\)', text, re.MULTILINE)]


#: The stand-ins by op and dispatch key: the forward under autograd too, where the C++
#: library registers its autograd function.
STAND_INS = {
    ("cpu_sae", "CPU"): cpu_reference.sae,
    ("cpu_sae", "Autograd"): cpu_reference.sae,
    ("cpu_sae_", "CPU"): cpu_reference.sae_in_place,
    ("cpu_sae_", "Autograd"): cpu_reference.sae_in_place,
    ("cpu_forward", "CPU"): cpu_reference.forward,
    ("cpu_backward", "CPU"): cpu_reference.backward,
    ("cpu_excite", "CPU"): cpu_reference.excite,
}
_stand_ins: torch.library.Library | None = None


def _stand_in(name: str, compute):
    """Loads the library on the first call and runs the op there, else computes it."""
    def kernel(*args):
        if available():
            return getattr(torch.ops.sae_kernels, name)(*args)
        return compute(*args)
    return kernel


def _install_stand_ins() -> None:
    global _stand_ins
    _stand_ins = torch.library.Library("sae_kernels", "IMPL")
    for (name, key), compute in STAND_INS.items():
        _stand_ins.impl(name, _stand_in(name, compute), key)


def _retire_stand_ins() -> None:
    """Drop the stand-ins' registrations (the library's kernels take their place)."""
    global _stand_ins
    if _stand_ins is not None:
        _stand_ins._destroy()
        _stand_ins = None


def _define_ops() -> None:
    """Define the ops, their fake kernels and FLOP formulas; load a cached library, or
    leave the stand-ins in its place."""
    global _available
    if hasattr(torch.ops.sae_kernels, "cpu_sae"):  # the library was loaded before this package
        _available = True
    else:
        for schema in schemas():
            name, signature = schema.split("(", 1)
            torch.library.define(f"sae_kernels::{name}", f"({signature}",
                                 tags=(torch.Tag.flexible_layout,))
    for name, fake in (("cpu_sae", cpu_reference.sae_fake),
                       ("cpu_sae_", cpu_reference.sae_in_place_fake),
                       ("cpu_forward", cpu_reference.forward_fake),
                       ("cpu_backward", cpu_reference.backward_fake),
                       ("cpu_excite", cpu_reference.excite_fake)):
        torch.library.register_fake(f"sae_kernels::{name}", fake)
    flops.register("cpu")
    if _available:
        return
    _install_stand_ins()
    if os.environ.get("SAE_KERNELS_NO_CPU_EXTENSION") != "1" and library_path().exists():
        try:
            build()
        except Exception:  # a broken cached build: the first call warns and falls back
            pass


_define_ops()
