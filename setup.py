"""Packaging hook: wheels carry the C++ sources (csrc/) inside the package, where
``sae_kernels.kernels.cpu`` finds and builds them on first use, as it does in a checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self) -> None:
        super().run()
        shutil.copytree(Path(__file__).parent / "csrc",
                        Path(self.build_lib) / "sae_kernels" / "csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
