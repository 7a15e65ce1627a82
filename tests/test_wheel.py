"""A wheel carries the C++ sources: installed into a fresh environment, it finds and runs
the CPU kernels a checkout of the same sources built. The build cache is keyed on the
sources' content."""

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sae_kernels.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


def test_cache_key_follows_the_sources(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(cpu.CSRC, sources)
    monkeypatch.setattr(cpu, "CSRC", sources)
    before = cpu.build_dir()
    with open(sources / "kernels.h", "a") as f:
        f.write("\n// an edit\n")
    assert cpu.build_dir() != before
    assert cpu.build_dir().parent == before.parent


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler")
def test_wheel_in_a_fresh_environment_runs_the_cpu_kernels(tmp_path):
    """Build the wheel, install it (no dependencies: torch comes from this environment
    through a path file) into a new virtual environment, and run the fused op there. The
    installed package digests its own copy of the sources, so it finds this checkout's
    library (built here first) only if the wheel carries every source and header byte for
    byte: a missing or changed file gives another digest, and a library built elsewhere."""
    checkout_library = cpu.build()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("sae_kernels-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    # torch and numpy from this environment: a path line only (its .pth files, and with them
    # any editable install of this package, are not processed)
    (Path(fresh_site) / "outer_site_packages.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    code = textwrap.dedent("""
        import torch, sae_kernels
        from sae_kernels.kernels import cpu
        print(sae_kernels.__file__)
        print(cpu.CSRC)
        print(cpu.build())
        ref = sae_kernels.SaE(19, rd_channels=3, cardinality=2, residual=True)
        fused = sae_kernels.FusedSaE.from_module(ref, backend="cpu")
        x = torch.randn(2, 19, 5, 4, requires_grad=True)
        with torch.autograd.profiler.profile() as prof:
            y = fused(x)
        assert any(e.name == "sae_kernels::cpu_sae" for e in prof.function_events)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
        print(cpu.isa())
        """)
    env = {**os.environ, "SAE_KERNELS_BUILD_DIR": str(cpu.build_dir().parent)}
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    package, sources, library, isa = result.stdout.split()[-4:]
    assert package.startswith(fresh_site)
    assert sources == str(Path(fresh_site) / "sae_kernels" / "csrc")
    assert library == str(checkout_library)
    assert isa in ("avx512", "avx2", "generic")
