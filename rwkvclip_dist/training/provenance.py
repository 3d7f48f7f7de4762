"""What produced a run: ``provenance.json`` in the run directory (rank 0, at start-up, every launch).

The project's git commit and whether its tree had uncommitted changes (and which files), the Python,
torch, CUDA, cuDNN, NCCL and DeepSpeed versions, every installed distribution (``pip freeze``'s
content, read from the environment's metadata rather than by running pip), and the world layout
(ranks, nodes, tensor- and data-parallel sizes, hosts). The resolved recipe is ``recipe.yaml`` beside
it. A resumed or requeued run appends its launch to ``launches`` rather than overwriting the first.
"""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from rwkvclip_dist.outputs import write_json

PROJECT = Path(__file__).resolve().parent.parent.parent


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_state() -> dict[str, Any]:
    """The project's commit and dirty state (None where it is not a git checkout, e.g. a wheel)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "note": f"{PROJECT} is not a git checkout"}
    changed = [line[3:] for line in (_git("status", "--porcelain", "--untracked-files=no") or "").splitlines()]
    return {"git_commit": commit, "git_dirty": bool(changed), "git_changed_files": changed[:200]}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "platform": platform.platform()}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpu"] = torch.cuda.get_device_name(0)
    for name in ("deepspeed", "megatron-core", "mosaicml-streaming"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def installed() -> list[str]:
    """``name==version`` of every distribution in the environment, sorted (pip freeze's content)."""
    found = {(d.metadata["Name"] or "?").lower(): d.version for d in metadata.distributions()}
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def write_provenance(run_dir: Path, launch, tensor_parallel: int) -> Path:
    """Add this launch (``launch``: a ``LaunchEnv``; its world layout) to ``provenance.json``."""
    path = run_dir / "provenance.json"
    launches = json.loads(path.read_text()).get("launches", []) if path.is_file() else []
    layout = {"world_size": launch.world_size, "tensor_parallel": tensor_parallel,
              "data_parallel": launch.world_size // tensor_parallel,
              "nodes": launch.world_size // launch.local_world_size, "local_world_size": launch.local_world_size}
    launches.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                     **source_state(), "versions": versions(), "world": layout, "packages": installed()})
    write_json(path, {"launches": launches}, indent=1)
    return path
