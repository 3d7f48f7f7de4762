"""Shared fixtures: launching real multi-process (gloo) runs with torchrun, and the demo data set.

Multi-process tests start ``torchrun`` subprocesses with ``DS_ACCELERATOR=cpu`` and a cached
``TORCH_EXTENSIONS_DIR`` so DeepSpeed's CPU communication op is compiled once per machine. Stale
Streaming shared memory of killed ranks is removed after each such test (only segments no live
process uses, so concurrent runs on the machine are left alone).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def dist_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun sets one OpenMP thread per rank unless told otherwise; the trainer picks its own.
    env.pop("OMP_NUM_THREADS", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    from rwkvclip_dist.parallel.launch_env import free_port

    return [PYTHON, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "--max-restarts=0", *args]


def run_checked(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure show its output's tail in the assertion message."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return proc


@pytest.fixture
def clean_shm():
    yield
    from rwkvclip_dist.parallel.shm import clean_stale_shm

    clean_stale_shm()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The digits demo data set (MDS shards + zeroshot.json), built once per test session."""
    from rwkvclip_dist.data.demo_digits import ensure_demo_data

    return Path(ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "demo_digits")))
