"""Build and load the CUDA extension of csrc/bi_wkv with ninja (torch.utils.cpp_extension).

Nothing here runs at import time. The extension is named after a hash of its sources, compiler
flags, target architectures and the torch version, so a changed source never loads a stale
library, and a directory built ahead of time (``tools/build_ops.py``) is found by that name and
imported without a CUDA toolkit. Cache directory: ``RWKVCLIP_EXTENSIONS_DIR``, else
``TORCH_EXTENSIONS_DIR``, else ``~/.cache/rwkvclip_dist/extensions``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _kernel_sources_root() -> Path:
    """csrc/ of the repository checkout, else the copy an installed wheel carries (setup.py)."""
    checkout = REPO_ROOT / "csrc"
    if (checkout / "bi_wkv").is_dir():
        return checkout
    return Path(__file__).resolve().parents[1] / "_csrc"


CSRC = _kernel_sources_root()
SOURCE_DIR = CSRC / "bi_wkv"
SOURCES = ("bi_wkv_ops.cpp", "sweep_forward.cu", "sweep_query.cu", "sweep_key.cu", "sweep_fused.cu")
EMULATION_SOURCE = CSRC / "testing" / "cpu_emulation.cpp"
HEADERS = ("bi_wkv_host.h", "sweep_params.h", "sweep_kernel.cuh", "sweep_launch.cuh", "tile_mma.cuh",
           "chunk_load.cuh", "sweep_tiles.cuh", "fused_outputs.cuh", "sweep_fused.cuh")
EMULATION_HEADERS = ("wmma_emulation.h",)
DEFAULT_ARCHS = ("8.0", "9.0")


class ToolkitNotFound(RuntimeError):
    """No usable CUDA toolkit (nvcc plus the runtime library) was found."""


def _is_toolkit(prefix: Path) -> bool:
    """A prefix is a toolkit when it holds nvcc, cuda_runtime.h and libcudart (the link needs it)."""
    libs = [prefix / "lib64", prefix / "lib", *prefix.glob("targets/*/lib")]
    has_cudart = any(any(d.glob("libcudart.so*")) for d in libs if d.is_dir())
    return (prefix / "bin" / "nvcc").exists() and (prefix / "include" / "cuda_runtime.h").exists() and has_cudart


def find_cuda_home() -> Path:
    """The CUDA toolkit: ``CUDA_HOME`` (or ``CUDA_PATH``) if set, else found from ``nvcc`` on PATH.

    ``nvcc`` may be a wrapper script outside the toolkit (/usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc), where torch's guess, the parent of its directory, lacks the
    runtime library and the link fails on -lcudart. So each candidate is checked, and nvcc is asked
    where it lives when its own path does not lead to a toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            prefix = Path(os.environ[var])
            if not _is_toolkit(prefix):
                raise ToolkitNotFound(f"{var}={prefix} is not a CUDA toolkit (needs bin/nvcc, "
                                      "include/cuda_runtime.h and libcudart)")
            return prefix
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ToolkitNotFound("nvcc is not on PATH and CUDA_HOME is not set")
    candidates = [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, flags=re.MULTILINE)
    if here:
        candidates.append(Path(here.group(1).strip()).parent)
    for prefix in candidates:
        if _is_toolkit(prefix):
            return prefix.resolve()
    raise ToolkitNotFound(f"nvcc at {nvcc} does not lead to a CUDA toolkit (tried {[str(c) for c in candidates]})")


def wheel_cuda_includes() -> list[str]:
    """Headers the CUDA torch wheel ships (nvidia/cu13/include) that ATen/cuda/CUDAContext.h reaches."""
    found = []
    for entry in sys.path:
        for sub in ("cu13", "cu12"):
            path = Path(entry) / "nvidia" / sub / "include"
            if path.is_dir():
                found.append(str(path))
    return found


def extensions_dir() -> Path:
    root = os.environ.get("RWKVCLIP_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "rwkvclip_dist" / "extensions"


@dataclass(frozen=True)
class BuildConfig:
    """How the extension is compiled."""

    archs: tuple[str, ...] = DEFAULT_ARCHS
    """Compute capabilities, e.g. ("8.0", "9.0"); a GPU run may pass just its own."""
    ptxas_verbose: bool = False
    """Add -Xptxas -v: registers, shared memory and spills of every kernel in the build log."""
    jobs: int = field(default_factory=lambda: min(3, os.cpu_count() or 1))
    """Parallel ninja jobs (the three sweep kinds are separate translation units)."""

    def code_flags(self) -> list[str]:
        """The flags that decide the binary (so they name it)."""
        flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        for arch in self.archs:
            num = arch.replace(".", "")
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        return flags

    def cuda_flags(self) -> list[str]:
        return self.code_flags() + (["-Xptxas=-v"] if self.ptxas_verbose else [])

    def name(self) -> str:
        """rwkvclip_bi_wkv_<hash of sources, code flags, torch version>; -Xptxas -v is left out
        because it changes the log, not the library."""
        digest = hashlib.sha256()
        for rel in (*SOURCES, *HEADERS):
            digest.update(rel.encode())
            digest.update((SOURCE_DIR / rel).read_bytes())
        digest.update(" ".join(self.code_flags()).encode())
        digest.update(torch.__version__.encode())
        return f"rwkvclip_bi_wkv_{digest.hexdigest()[:12]}"


def library_path(config: BuildConfig, root: Path | None = None) -> Path:
    name = config.name()
    return (root or extensions_dir()) / name / f"{name}.so"


def import_prebuilt(path: Path) -> ModuleType:
    """Import a built extension without ninja or a toolkit (what an ahead-of-time build is for)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the Bi-WKV extension from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def pinned_arch_list(archs: tuple[str, ...]):
    """torch adds -gencode flags from TORCH_CUDA_ARCH_LIST (or the visible GPU); pin them to ours."""
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


@contextlib.contextmanager
def _capture_fd_output(log_path: Path):
    """ninja writes compiler output to file descriptors 1 and 2; send both to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def use_toolkit() -> Path:
    """Point torch.utils.cpp_extension at the toolkit of `find_cuda_home` (torch fixed its own
    guess when it was imported) and return it."""
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    cpp_extension.CUDA_HOME = str(cuda_home)
    os.environ["CUDA_HOME"] = str(cuda_home)
    return cuda_home


def build(config: BuildConfig = BuildConfig(), root: Path | None = None) -> tuple[ModuleType, Path]:
    """Compile (or find compiled) and import the extension. Returns (module, build directory).

    The compiler output of a real build is kept in ``<build dir>/build.log`` (with ptxas statistics
    when ``config.ptxas_verbose``); a build that ninja finds up to date leaves the old log.
    """
    from torch.utils import cpp_extension

    if not SOURCE_DIR.is_dir():
        raise FileNotFoundError(f"the Bi-WKV CUDA sources are not in this installation: no {SOURCE_DIR} (a "
                                "repository checkout has csrc/bi_wkv, a wheel rwkvclip_dist/_csrc/bi_wkv)")
    use_toolkit()
    name = config.name()
    build_dir = (root or extensions_dir()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    includes = [str(SOURCE_DIR), *wheel_cuda_includes()]
    old_jobs = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = str(config.jobs)
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".log", delete=False) as tmp:
        fresh_log = Path(tmp.name)
    try:
        with pinned_arch_list(config.archs), _capture_fd_output(fresh_log):
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE_DIR / s) for s in SOURCES],
                extra_cflags=["-O3", "-std=c++20"],
                extra_cuda_cflags=config.cuda_flags(),
                extra_include_paths=includes,
                build_directory=str(build_dir),
                verbose=True,
            )
    except (RuntimeError, OSError) as err:
        tail = "\n".join(fresh_log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"building the Bi-WKV extension failed ({err}); full log: {fresh_log}\n{tail}") from err
    finally:
        if old_jobs is None:
            os.environ.pop("MAX_JOBS", None)
        else:
            os.environ["MAX_JOBS"] = old_jobs
    if "ninja: no work to do" in fresh_log.read_text(errors="replace"):
        fresh_log.unlink()
    else:
        fresh_log.replace(build_dir / "build.log")
    return module, build_dir


def build_cpu_emulation(root: Path | None = None) -> ModuleType:
    """The kernels of csrc/bi_wkv compiled for CPU threads (csrc/testing/cpu_emulation.cpp), with
    the same ``forward``/``backward`` bindings: lets tests execute the kernel source without a GPU.
    Needs the toolkit's headers (cuda_bf16.h, cuda_runtime.h), not nvcc."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(EMULATION_SOURCE.read_bytes())
    for rel in HEADERS:
        digest.update((SOURCE_DIR / rel).read_bytes())
    for rel in EMULATION_HEADERS:
        digest.update((EMULATION_SOURCE.parent / rel).read_bytes())
    name = f"rwkvclip_bi_wkv_emulation_{digest.hexdigest()[:12]}"
    build_dir = (root or extensions_dir()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(EMULATION_SOURCE)], build_directory=str(build_dir),
        extra_cflags=["-O2", "-std=c++20", "-pthread"], extra_ldflags=["-pthread"],
        extra_include_paths=[str(SOURCE_DIR), str(find_cuda_home() / "include"), *wheel_cuda_includes()])
