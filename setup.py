"""Everything is configured in pyproject.toml; this only adds one build step: the top-level csrc/
directory (the CUDA kernel sources) is copied into the built package as rwkvclip_dist/_csrc, so an
installed wheel can still JIT-compile the kernels (rwkvclip_dist/ops/build.py looks there when the
package does not sit in a repository checkout). Editable installs read csrc/ in place."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "csrc"
        target = Path(self.build_lib) / "rwkvclip_dist" / "_csrc"
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithKernelSources})
