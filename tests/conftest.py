"""Shared fixtures and helpers: launching real multi-process (gloo) runs with torchrun, reading what a
training run wrote, finding its rank processes, and the demo data set.

Multi-process tests start ``torchrun`` subprocesses with ``DS_ACCELERATOR=cpu`` and a cached
``TORCH_EXTENSIONS_DIR`` so DeepSpeed's CPU communication op is compiled once per machine. Stale
Streaming shared memory of killed ranks is removed after each such test (only segments no live
process uses, so concurrent runs on the machine are left alone).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAIN = str(REPO / "rwkvclip_dist" / "train.py")
DEMO_RECIPE = str(REPO / "recipes" / "demo_digits.yaml")


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


def loss_log(run_dir: Path) -> list[dict]:
    """The records of a run's ``loss_log.jsonl`` (empty before its first step)."""
    path = run_dir / "loss_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """train.py arguments: the demo recipe on ``data``'s training split, small batches, quiet logs."""
    return [TRAIN, "--recipe", DEMO_RECIPE, "--run-dir", str(run_dir),
            f"data.streams=[{{remote: {data / 'train'}}}]", "data.batch_size=16",
            "eval.zeroshot=[]", "logging.every_steps=1", "logging.progress_bar=false",
            "logging.tensorboard=false", *extra]


def rank_processes(launcher: subprocess.Popen) -> dict:
    """``{rank: psutil.Process}`` of the train.py workers under a torchrun launcher."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "RANK" in env and "train.py" in " ".join(child.cmdline()):
            ranks[int(env["RANK"])] = child
    return ranks


# A fixed canonical node count: Streaming otherwise derives the sample order from the number of nodes,
# and the two-node Slurm test compares against this one-node run.
REFERENCE_STEPS = ("train.steps=12", "checkpoint.every_steps=3", "checkpoint.keep_last=2", "data.num_canonical_nodes=2")


@pytest.fixture(scope="session")
def reference_losses(demo_data, tmp_path_factory) -> dict[int, float]:
    """``{step: loss}`` of one uninterrupted 2-rank run of :func:`train_args` with ``REFERENCE_STEPS``,
    shared by every test that checks an interrupted run of that recipe against it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_checked(torchrun_cmd(2, *train_args(run, demo_data, *REFERENCE_STEPS)), timeout=600, env=dist_env())
    losses = {r["step"]: r["loss"] for r in loss_log(run)}
    assert sorted(losses) == list(range(1, 13))
    return losses


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    """Poll ``condition()`` until truthy; fail naming ``what`` (and ``proc``'s exit) on timeout."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def clean_shm():
    yield
    from rwkvclip_dist.data.shm import clean_stale_shm

    clean_stale_shm()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The digits demo data set (MDS shards + zeroshot.json), built once per test session."""
    from rwkvclip_dist.data.demo_digits import ensure_demo_data

    return Path(ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "demo_digits")))
