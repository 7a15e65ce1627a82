"""The C++ CPU kernels in csrc/: built on first use (cached), loaded as torch ops.

The build takes about half a minute, once per torch version and source change; the
result is cached under ``SAE_KERNELS_BUILD_DIR`` (default ``~/.cache/sae_kernels``).
``python -m sae_kernels build`` builds ahead of time. Where no compiler is present or
the build fails, a warning is given and CPU tensors take the reference path.

Environment switches:
    SAE_KERNELS_NO_CPU_EXTENSION=1   never build or load the extension
    SAE_KERNELS_BUILD_DIR=DIR        where builds are cached
    SAE_KERNELS_CPU_ISA=avx512|avx2|generic   force an instruction set (default: the best)
    SAE_KERNELS_CPU_CHUNK_BYTES=N    bytes of x per chunk kept in cache between passes
"""

import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import flops

#: Sources, found beside the package in a checkout or an editable install.
CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("forward.cpp", "backward.cpp", "register.cpp", "kernels_avx512.cpp",
           "kernels_avx2.cpp", "kernels_generic.cpp")
FLAGS = ["-O3", "-fopenmp"]


def build_dir() -> Path:
    root = Path(os.environ.get("SAE_KERNELS_BUILD_DIR", Path.home() / ".cache" / "sae_kernels"))
    return root / f"torch-{torch.__version__.replace('+', '_')}"


def build(verbose: bool = False) -> None:
    """Compile (if the sources changed) and load the extension; raises on failure."""
    from torch.utils.cpp_extension import load

    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found in {CSRC}: {', '.join(missing)}")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "sae_kernels_cpu.so"
    stale = not library.exists() or any(
        p.stat().st_mtime > library.stat().st_mtime for p in CSRC.iterdir())
    if stale:
        print(f"sae_kernels: building the C++ CPU kernels (once; cached in {directory}) ...",
              end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        load(name="sae_kernels_cpu", sources=[str(CSRC / s) for s in SOURCES],
             extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
             is_python_module=False, verbose=verbose)
    finally:
        if stale:
            print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    flops.register("cpu")


_available: bool | None = None


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the CPU kernels are loaded, building them on the first call."""
    global _available
    if _available is None:
        _available = _load()
    return _available


def _load() -> bool:
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
