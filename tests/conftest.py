"""Shared fixtures and helpers: launching real multi-process (gloo) runs with torchrun, reading what a
training run wrote, finding its rank processes, the demo data set, and the small images, tars, MDS
shards and CSV corpora the data, caption and description tests build. No test file imports another
(tests/test_layout.py checks); larger helpers live in plain modules beside this one: tool_loader.py
(tools/ scripts), chat_server.py (the stand-in for vLLM), slurm_cluster.py (the Slurm test cluster).

Multi-process tests start ``torchrun`` subprocesses with ``DS_ACCELERATOR=cpu`` and a cached
``TORCH_EXTENSIONS_DIR`` so compiled ops (DeepSpeed's CPU Adam, the kernels) are built once per machine. Stale
Streaming shared memory of killed ranks is removed after each such test (only segments no live
process uses, so concurrent runs on the machine are left alone).
"""
from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAIN = str(REPO / "rwkvclip_dist" / "train.py")
DEMO_RECIPE = str(REPO / "recipes" / "demo_digits.yaml")

# Compiled ops are cached in TORCH_EXTENSIONS_DIR, but ninja keys each object on its command's hash and
# the system's ninja (1.11) hashes differently from the environment's (1.13): with both on the machine,
# the tests (run without the environment activated) and the Slurm jobs (which activate it) would
# recompile DeepSpeed's op on every switch, ~25-45 s each. This environment's tools come first.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers): which tests share a worker, and the order
    the groups are handed out in (tests/scheduling.py)."""
    plan_for_xdist(config, items)


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


def launch_cmd(nproc: int, *args: str) -> list[str]:
    """``nproc`` ranks of ``args`` (a script and its arguments) started as the deepspeed launcher starts
    them, without torchrun's ~1.9 s per launch (tests/launch_ranks.py); torchrun_cmd where the test is
    about torchrun."""
    from rwkvclip_dist.parallel.launch_env import free_port

    return [PYTHON, str(REPO / "tests" / "launch_ranks.py"), str(nproc), str(free_port()), *args]


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
    return read_rows(path) if path.is_file() else []


def digits_zeroshot(model, data: Path) -> dict[str, float]:
    """A single-process zero-shot evaluation of ``model`` on the demo's held-out digits, with the
    metric names of an in-loop ``eval.zeroshot`` task named ``digits``."""
    import torch

    from rwkvclip_dist.training.evals import ZeroShotEvalSection, ZeroShotTask

    section = ZeroShotEvalSection(name="digits", data=str(data / "heldout"), classes=str(data / "zeroshot.json"),
                                  batch_size=128, num_workers=0)
    return ZeroShotTask(section, model.config.image.image_size, model.config.text.context_length,
                        torch.device("cpu")).run(model)


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
    run_checked(launch_cmd(2, *train_args(run, demo_data, *REFERENCE_STEPS)), timeout=600, env=dist_env())
    losses = {r["step"]: r["loss"] for r in loss_log(run)}
    assert sorted(losses) == list(range(1, 13))
    return losses


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    """Poll ``condition()`` until truthy; fail naming ``what`` (and ``proc``'s exit) on timeout."""
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


@pytest.fixture
def clean_shm_before_and_after():
    """For tests that open Streaming datasets in this process: stale segments removed before the test
    as well as after it."""
    from rwkvclip_dist.data.shm import clean_stale_shm

    clean_stale_shm()
    yield
    clean_stale_shm()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The digits demo data set (MDS shards + zeroshot.json), built once per test session."""
    from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data

    return Path(ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "demo_digits")))


# Small inputs of the data, caption and description tests.

# The variables that make a process a torch.distributed rank; tests that fork ranks restore them.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CORPUS_CAPTIONS = [
    ("a red car parked on a street", ["car", "street"]),
    ("two brown dogs running on a beach", ["dog", "beach"]),
    ("a woman holding an umbrella", ["woman", "umbrella"]),
]


def jpeg(seed: int, size=(24, 16), fmt="JPEG") -> bytes:
    """A noise image of ``size`` (width, height), the same bytes for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member ``name`` holding ``data`` to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@functools.cache
def _make_shards_tool():
    from tool_loader import tool_module

    return tool_module("make_shards")


def make_shards(argv: list[str]) -> int:
    """Exit status of tools/make_shards.py's ``main(argv)`` (the tool is loaded once per session)."""
    return _make_shards_tool().main(argv)


def read_back(out: str) -> dict[str, dict]:
    """All samples by key, via stock Streaming (fails on duplicate keys)."""
    from streaming import StreamingDataset

    from rwkvclip_dist.data.shm import clean_stale_shm

    clean_stale_shm()
    ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
    rows = [ds[i] for i in range(len(ds))]
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "duplicate keys in the output"
    del ds
    clean_stale_shm()
    return by_key


def write_shards(path: str, n: int, prefix: str = "s", synthetic_every: int = 1, corrupt=(),
                 size_limit: int = 1 << 14) -> None:
    """``n`` rows with unique texts ``{prefix} raw i`` etc.; rows ``i % synthetic_every != 0`` lack a
    synthetic caption; rows in ``corrupt`` carry undecodable image bytes."""
    from streaming import MDSWriter

    from rwkvclip_dist.data.columns import COMPRESSION, columns

    with MDSWriter(out=path, columns=columns(), compression=COMPRESSION, size_limit=size_limit) as w:
        for i in range(n):
            image = b"\xff\xd8 broken" if i in corrupt else jpeg(i, size=(12, 12))
            w.write({"key": f"{prefix}{i}", "jpg": image, "raw": f"{prefix} raw {i}",
                     "synthetic": f"{prefix} synthetic {i}" if i % synthetic_every == 0 else "",
                     "generated": f"{prefix} generated {i}", "tags": [], "width": 12, "height": 12,
                     "source": "test"})


def text_index(prefix: str, n: int) -> dict[tuple, tuple[int, str]]:
    """Token row -> (sample index, text kind) of :func:`write_shards`' rows, to identify what a loader
    yielded."""
    from rwkvclip_dist.data.columns import TEXT_ID
    from rwkvclip_dist.data.tokenizer import tokenize

    out = {}
    for kind in TEXT_ID:
        toks = tokenize([f"{prefix} {kind} {i}" for i in range(n)])
        out.update({tuple(t.tolist()): (i, kind) for i, t in enumerate(toks)})
    return out


def caption_corpus(root: Path, n: int) -> Path:
    """``root/corpus.csv``: ``n`` rows (keys m00, m01, ...) of a JPEG under ``root/img``, a raw text
    naming the key, and a synthetic caption and tags from :data:`CORPUS_CAPTIONS`."""
    import pandas as pd
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (24, 24), (40 * i % 255, 90, 160)).save(root / "img" / f"{i}.jpg")
        caption, tags = CORPUS_CAPTIONS[i % len(CORPUS_CAPTIONS)]
        rows.append({"key": f"m{i:02d}", "image_path": f"img/{i}.jpg", "raw": f"holiday pic key=m{i:02d}",
                     "synthetic": caption, "tags": json.dumps(tags)})  # fmt: skip
    csv = root / "corpus.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def kill_once_written(cmd: list[str], out: Path, lines: int, timeout_s: float = 60) -> None:
    """Run ``cmd`` until ``out`` holds ``lines`` lines, then SIGKILL it: a crash in the middle of a run."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while (not out.exists() or len(out.read_bytes().splitlines()) < lines) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def read_rows(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

# Runs shared by several test files, registered as this folder's fixtures (last: shared_runs imports this module).
from scheduling import plan_for_xdist  # noqa: E402
from shared_runs import ema_eval_baseline, ema_zero2_run, siglip_ema_run, source_run  # noqa: E402,F401
