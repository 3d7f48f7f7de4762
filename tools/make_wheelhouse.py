"""Collect, on a machine with package access, the wheels an air-gapped CUDA machine lacks.

    python tools/make_wheelhouse.py --out wheelhouse                       # cp312, manylinux x86_64
    python tools/make_wheelhouse.py --out wh311 --python 3.11 --base-from-python /venv/bin/python
    tools/gpu_check.sh --wheelhouse wheelhouse OUT_DIR                     # there: install and run

The roots are the project's runtime dependencies (pyproject.toml) less torch and torchvision,
whose builds belong to the machine. Each is resolved through its wheels' Requires-Dist for the
target Python and platform (markers evaluated for it, extras ignored), stopping at packages the
target already has: ``--base cuda-image`` (default: the packages of the stock CUDA image of the
lent GPU machines, read off one on 2026-11-17) or ``--base-from-python PY`` (whatever that
interpreter has installed). Versions follow constraints.txt where it pins them (the tested set),
else the newest wheel. DeepSpeed has no wheel on PyPI: its sdist is built here into a pure-Python
wheel with no ops prebuilt (DS_BUILD_OPS=0; it needs torch here, not on the target).

Left out on purpose (each named with its reason in SKIPPED): Streaming's remote-storage clients
(boto3, google-cloud-storage, azure-*, oci, paramiko: imported only when a remote URL is read;
the shards here are local) and megatron-core (the package does not import it yet). Streaming's
data loader imports transformers at the top, so it stays (the CUDA image has it). The result must stay under --max-mib (default 45 MiB), since it
travels with the checkout. Install on the target with
``pip install --no-index --no-deps --target PREFIX wheelhouse/*.whl`` and ``PYTHONPATH=PREFIX``
(what ``gpu_check.sh --wheelhouse`` does).
"""
from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections import deque
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rwkvclip_dist.cli import run_tool

REPO = Path(__file__).resolve().parent.parent
NOT_ROOTS = {"torch", "torchvision"}  # tied to the machine's CUDA build
SKIPPED = {
    "boto3": "Streaming's S3 client: imported only for s3:// remotes",
    "botocore": "Streaming's S3 client",
    "google-cloud-storage": "Streaming's GCS client: imported only for gs:// remotes",
    "oci": "Streaming's OCI client: imported only for oci:// remotes",
    "azure-storage-blob": "Streaming's Azure client: imported only for azure:// remotes",
    "azure-storage-file-datalake": "Streaming's Azure client",
    "azure-identity": "Streaming's Azure client",
    "paramiko": "Streaming's SFTP client: imported only for sftp:// remotes",
    "megatron-core": "not imported by rwkvclip_dist yet (tensor parallelism is planned)",
}
# The stock CUDA image of the lent GPU machines (torch 2.11 + CUDA 13, Python 3.12), as listed
# on 2026-11-17: only names matter here.
CUDA_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp"""


def project_roots() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(Requirement(d).name) not in NOT_ROOTS]


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            found[canonicalize_name(name)] = version.strip()
    return found


def installed_names(python: str) -> set[str]:
    code = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return {canonicalize_name(n) for n in out.split()}


def marker_environment(python: str, platform: str) -> dict[str, str]:
    machine = "x86_64" if platform.endswith("x86_64") else "aarch64"
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
            "platform_system": "Linux", "platform_machine": machine, "extra": ""}


def requirements_of(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(meta).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def platform_tags(platform: str) -> list[str]:
    """manylinux_2_17 ... 2_39 for the given architecture: pip matches each tag exactly."""
    machine = platform.rsplit("_", 1)[-1] if not platform.endswith("x86_64") else "x86_64"
    tags = [f"manylinux_2_{n}_{machine}" for n in range(39, 16, -1)]
    return tags + [f"manylinux2014_{machine}", f"manylinux1_{machine}", "linux_" + machine]


def pip(*args: str, env: dict | None = None, check: bool = True, what: str = "") -> bool:
    """Run pip; True on success. With check=False a failure returns False (its error stays quiet)."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=None if check else subprocess.DEVNULL)
    if check and done.returncode:
        raise SystemExit(f"make_wheelhouse: pip {args[0]} failed for {what} (exit {done.returncode})")
    return done.returncode == 0


def fetch_wheel(req: Requirement, version: str | None, python: str, platform: str, into: Path) -> Path:
    """The pinned version's wheel for the target; when that version has none (e.g. a pin made on
    another Python), the newest wheel the requirement allows, with a note."""
    specs = ([f"{req.name}=={version}"] if version else []) + [f"{req.name}{req.specifier}"]
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp:
            args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation",
                    "cp", "-d", tmp, spec]
            for tag in platform_tags(platform):
                args += ["--platform", tag]
            if pip(*args, check=spec == specs[-1], what=spec):
                wheel = next(Path(tmp).iterdir())
                if spec != specs[0]:
                    print(f"note: {specs[0]} has no wheel for CPython {python} {platform}; took {wheel.name}")
                return Path(shutil.move(str(wheel), into / wheel.name))
    raise AssertionError("unreachable: the last spec raises")


def build_deepspeed(version: str | None, into: Path) -> Path:
    """DeepSpeed's sdist -> a pure-Python wheel with no ops prebuilt (they JIT-build if ever used)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"deepspeed=={version}" if version else "deepspeed"
        pip("download", "--no-deps", "--no-binary=:all:", "-d", tmp, spec, what=spec)
        sdist = next(Path(tmp).iterdir())
        env = {**os.environ, "DS_BUILD_OPS": "0", "DS_BUILD_STRING": ""}
        built = Path(tmp) / "built"
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(built), str(sdist), env=env, what=sdist.name)
        wheel = next(built.glob("*.whl"))
        return Path(shutil.move(str(wheel), into / wheel.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_wheelhouse.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="wheelhouse directory (created)")
    parser.add_argument("--python", default="3.12", help="target Python version (default 3.12, the GPU image's)")
    parser.add_argument("--platform", default="manylinux_x86_64", help="manylinux_x86_64 or manylinux_aarch64")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--base", choices=("cuda-image",), default="cuda-image",
                      help="what the target already has (default: the lent GPU machines' CUDA image)")
    base.add_argument("--base-from-python", metavar="PY", help="the target has what this interpreter has")
    parser.add_argument("--max-mib", type=float, default=45.0, help="fail if the wheelhouse grows past this")
    return parser


def run(args: argparse.Namespace) -> int:
    have = (installed_names(args.base_from_python) if args.base_from_python
            else {canonicalize_name(n) for n in CUDA_IMAGE.split()})
    environment = marker_environment(args.python, args.platform)
    pinned = pins()
    args.out.mkdir(parents=True, exist_ok=True)
    queue = deque(Requirement(r) for r in project_roots())
    seen: set[str] = set()
    taken, skipped = [], []
    while queue:
        req = queue.popleft()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate(environment)):
            continue
        seen.add(name)
        if name in have or name in NOT_ROOTS:
            continue
        if name in SKIPPED:
            skipped.append(f"{name} ({SKIPPED[name]})")
            continue
        if name == "deepspeed":
            wheel = build_deepspeed(pinned.get(name), args.out)
        else:
            wheel = fetch_wheel(req, pinned.get(name), args.python, args.platform, args.out)
        taken.append(wheel)
        queue.extend(r for r in requirements_of(wheel) if not (r.marker and "extra" in str(r.marker)))
    total = sum(p.stat().st_size for p in args.out.glob("*.whl")) / 2**20
    for wheel in sorted(taken):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total:7.2f} MiB  in {len(taken)} wheels for CPython {args.python} {args.platform} in {args.out}")
    print("left out: " + "; ".join(skipped))
    if total > args.max_mib:
        raise SystemExit(f"make_wheelhouse: {total:.1f} MiB is over --max-mib {args.max_mib}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
