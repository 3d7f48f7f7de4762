"""Checkpoints that survive what happens to files: saves SIGKILLed at every stage, files truncated or
deleted afterwards, a full disk, and files crafted to run code when unpickled.

One single-process DeepSpeed engine (ZeRO-2) saves step 1, then each fault is injected into a
forked copy of the process that saves step 2 into its own copy of the directory and is SIGKILLed at
the chosen point (a real process dying mid-save; the injection patches the write functions of that
copy only; with one rank, its collectives are identities). The parent then resumes from every directory and must get step 1's exact weights. The
2-rank case (one rank killed between the ranks' files) runs under torchrun, whose restart resumes.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, REPO

KILL_POINTS = ("deepspeed_file", "rank_file", "before_marker", "after_marker", "during_latest")
MARKER = "code_ran.txt"


def _engine():
    import torch

    from rwkvclip_dist import create_model
    from rwkvclip_dist.parallel.engine import ParallelSection, create_engine, deepspeed_config, init_distributed
    from rwkvclip_dist.parallel.launch_env import detect_launch_env

    launch = detect_launch_env()
    init_distributed(launch, "gloo")
    torch.manual_seed(0)
    model = create_model("tiny")
    engine = create_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), deepspeed_config(
        ParallelSection(zero_stage=2, precision="fp32"), micro_batch=2, accumulation_steps=1,
        world_size=launch.world_size, grad_clip=1.0))
    # One optimizer step, so the checkpoints hold Adam's moments (full size, as in a run).
    engine.backward(sum(p.square().sum() for p in engine.module.parameters()))
    engine.step()
    return launch, engine


def _weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _save(manager, engine, step: int) -> None:
    from rwkvclip_dist.checkpoint.record import RunRecord
    from rwkvclip_dist.training.state import TrainState

    manager.save(engine, {"train_state": TrainState(step=step, samples=2 * step)}, RunRecord(step=step, world_size=1))


def _load(directory: Path, engine) -> tuple[int, dict]:
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.training.state import TrainState

    state = TrainState()
    record = CheckpointManager(directory).load(engine, {"train_state": state})
    assert record.step == state.step
    return state.step, _weights(engine)


def _die_writing_half(data: bytes, path: Path) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


class _Done:
    def wait(self, *args, **kwargs) -> bool:
        return True


def _single_rank_collectives() -> None:
    """A forked copy has none of gloo's threads, so its collectives would wait forever; with one rank
    they are the identity. (DeepSpeed's save calls these two.)"""
    import torch.distributed as dist

    def identity(*args, async_op: bool = False, **kwargs):
        return _Done() if async_op else None

    dist.barrier = dist.all_reduce = identity


def _inject(point: str) -> None:
    """Arm the kill ``point`` in this (forked) process."""
    import torch

    _single_rank_collectives()

    from rwkvclip_dist.checkpoint import manager

    real_torch_save, real_save, real_text = torch.save, manager._atomic_torch_save, manager._atomic_write_text

    def torch_save(obj, f, *args, **kwargs):
        if point == "deepspeed_file" and "optim_states" in str(f):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            _die_writing_half(buffer.getvalue(), Path(f))
        return real_torch_save(obj, f, *args, **kwargs)

    def atomic_torch_save(obj, path):
        if point == "rank_file" and path.name.startswith("rank_"):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            _die_writing_half(buffer.getvalue(), path.with_name(path.name + ".tmp"))
        if point == "before_marker" and path.name == manager.CLIENT_FILE:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path)

    def atomic_write_text(path, text):
        if path.name == "latest" and point == "after_marker":
            os.kill(os.getpid(), signal.SIGKILL)
        if path.name == "latest" and point == "during_latest":
            _die_writing_half(text.encode(), path.with_name(path.name + ".tmp"))
        return real_text(path, text)

    torch.save, manager._atomic_torch_save, manager._atomic_write_text = torch_save, atomic_torch_save, atomic_write_text


class Evil:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code an attacker picks."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def single(root: str) -> None:
    """World size 1: every kill point, damaged files, crafted pickles. Prints a JSON report."""
    import torch

    from rwkvclip_dist.checkpoint.integrity import CheckpointError
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.checkpoint.safe_load import UnsafeCheckpointError

    root = Path(root)
    _, engine = _engine()
    clean = root / "clean"
    _save(CheckpointManager(clean), engine, 1)
    step1 = _weights(engine)
    for p in engine.module.parameters():
        p.data.add_(1.0)  # step 2 differs, so loading it by mistake would show
    report = {}
    for point in KILL_POINTS:
        directory = root / point
        shutil.copytree(clean, directory)
        pid = os.fork()
        if pid == 0:
            _inject(point)
            _save(CheckpointManager(directory), engine, 2)
            os._exit(0)  # not reached: the injection kills the process
        _, status = os.waitpid(pid, 0)
        tag_dir = directory / "step_00000002"
        step, weights = _load(directory, engine)
        report[point] = {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                         "latest": (directory / "latest").read_text().strip(), "step": step,
                         "marker": (tag_dir / "client_state.pt").exists(), "weights": _same(weights, step1)}
        # The next save of that step clears what the dead one left, and completes.
        _save(CheckpointManager(directory), engine, 2)
        report[point]["then_saved"] = (directory / "latest").read_text().strip()

    # A complete step 2 whose files were damaged afterwards: skipped for step 1, set aside.
    full = root / "full"
    shutil.copytree(clean, full)
    _save(CheckpointManager(full), engine, 2)
    for damage in ("truncated", "missing", "both"):
        directory = root / damage
        shutil.copytree(full, directory)
        optim = next((directory / "step_00000002").glob("*optim_states.pt"))
        if damage == "missing":
            (directory / "step_00000002" / "rank_00000.pt").unlink()
        else:
            os.truncate(optim, optim.stat().st_size // 2)
        if damage == "both":
            os.truncate(directory / "step_00000001" / "rank_00000.pt", 10)
        try:
            step, weights = _load(directory, engine)
            report[damage] = {"step": step, "weights": _same(weights, step1)}
        except CheckpointError as err:
            report[damage] = {"error": str(err)}
        report[damage]["dirs"] = sorted(p.name for p in directory.iterdir())
        report[damage]["latest"] = (directory / "latest").read_text().strip()

    # Crafted pickles with a matching manifest: a file that would create MARKER when unpickled.
    for name in ("mp_rank_00_model_states.pt", "rank_00000.pt"):
        directory = root / f"evil_{name}"
        shutil.copytree(full, directory)
        target = directory / "step_00000002" / name
        target.write_bytes(pickle.dumps({"module": Evil(root / MARKER)}, protocol=2))  # torch's legacy format
        manifest = json.loads((directory / "step_00000002" / "manifest.json").read_text())
        manifest["files"][name] = target.stat().st_size
        (directory / "step_00000002" / "manifest.json").write_text(json.dumps(manifest))
        try:
            _load(directory, engine)
            report[f"evil_{name}"] = "loaded"
        except UnsafeCheckpointError as err:
            report[f"evil_{name}"] = str(err)
    # torch.save's zip format (what DeepSpeed writes), in a checkpoint without a manifest (older).
    directory = root / "evil_zip"
    shutil.copytree(full, directory)
    target = next((directory / "step_00000002").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Evil(root / MARKER)}, target)
    os.remove(directory / "step_00000002" / "manifest.json")
    try:
        _load(directory, engine)
        report["evil_no_manifest"] = "loaded"
    except UnsafeCheckpointError as err:
        report["evil_no_manifest"] = str(err)
    report["code_ran"] = (root / MARKER).exists()
    try:
        CheckpointManager(clean).refuse_to_overwrite()  # what a run with checkpoint.resume=false does
        report["start_over"] = "allowed"
    except CheckpointError as err:
        report["start_over"] = str(err)
    CheckpointManager(root / "empty").refuse_to_overwrite()
    report["disk_full"] = _disk_full(root / "small", clean, engine, step1)
    print("REPORT " + json.dumps(report))


def ranks(root: str) -> None:
    """2 ranks under ``torchrun --max-restarts=1``. Attempt 0: save step 1, then rank 1 dies between the
    ranks' files of step 2 (rank 0 has written its own). Attempt 1: resume and report."""
    import torch

    from rwkvclip_dist.checkpoint import manager as manager_module
    from rwkvclip_dist.checkpoint.manager import CheckpointManager

    root = Path(root)
    launch, engine = _engine()
    directory = root / "checkpoints"
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        _save(CheckpointManager(directory), engine, 1)
        if launch.rank == 0:
            torch.save(_weights(engine), root / "step1.pt")
        for p in engine.module.parameters():
            p.data.add_(1.0)
        real_save = manager_module._atomic_torch_save

        def dying_save(obj, path):
            if launch.rank == 1 and path.name.startswith("rank_"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path)

        manager_module._atomic_torch_save = dying_save
        _save(CheckpointManager(directory), engine, 2)
        raise AssertionError("the save was expected to fail: rank 1 died")
    tag_dir = directory / "step_00000002"
    left = sorted(p.name for p in tag_dir.iterdir()) if tag_dir.is_dir() else []
    step, weights = _load(directory, engine)
    if launch.rank == 0:
        (root / "report.json").write_text(json.dumps({
            "left": left, "step": step, "weights": _same(weights, torch.load(root / "step1.pt"))}))


def _disk_full(mount: Path, clean: Path, engine, step1: dict) -> dict | str:
    """Saves on a tmpfs with room for one checkpoint and a half: the pre-save check, then (with the
    check disabled) a write that runs out of space half-way."""
    from rwkvclip_dist.checkpoint import manager as manager_module
    from rwkvclip_dist.checkpoint.integrity import CheckpointSpaceError, manifest_bytes
    from rwkvclip_dist.checkpoint.manager import CheckpointManager

    size = manifest_bytes(clean / "step_00000001")
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6)}", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return f"skipped: cannot mount a tmpfs here ({mounted.stderr.strip()})"
    try:
        directory = mount / "checkpoints"
        manager = CheckpointManager(directory)
        _save(manager, engine, 1)
        saved = _weights(engine)
        result = {}
        for case in ("pre_check", "mid_write"):
            if case == "mid_write":
                manager_module.check_space = lambda *args, **kwargs: None
            try:
                _save(manager, engine, 2)
                result[case] = "saved"
            except CheckpointSpaceError as err:
                result[case] = str(err)
            # (DeepSpeed copies its zero_to_fp32.py recovery scripts beside the checkpoints.)
            result[case + "_dirs"] = sorted(p.name for p in directory.iterdir() if p.suffix != ".py")
        step, weights = _load(directory, engine)
        result.update(step=step, weights=_same(weights, saved), size=size)
        return result
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(scope="module")
def single_report(tmp_path_factory):
    from conftest import dist_env

    root = tmp_path_factory.mktemp("faults")
    proc = subprocess.run([PYTHON, __file__, "single", str(root)], cwd=REPO, env=dist_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):]), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_at_any_point_resumes_from_the_previous_checkpoint(single_report, point):
    got = single_report[0][point]
    assert got["killed"], got
    # Never counted as latest, never loaded: step 1's weights come back.
    assert (got["latest"], got["step"], got["weights"]) == ("step_00000001", 1, True), got
    assert got["marker"] == (point in ("after_marker", "during_latest")), got
    assert got["then_saved"] == "step_00000002", got


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_detected_and_skipped(single_report, damage):
    report, log = single_report
    got = report[damage]
    assert (got["step"], got["weights"], got["latest"]) == (1, True, "step_00000001"), got
    assert "step_00000002.broken" in got["dirs"] and "step_00000002" not in got["dirs"]
    expected = "rank_00000.pt is missing" if damage == "missing" else "optim_states.pt has "
    assert any("step_00000002 is damaged, skipping it" in line and expected in line for line in log.splitlines())


@pytest.mark.slow
def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(single_report):
    got = single_report[0]["both"]
    assert got["error"].startswith("no intact checkpoint in "), got
    assert "step_00000001: " in got["error"] and "step_00000002: " in got["error"]


@pytest.mark.slow
def test_a_full_disk_stops_the_save_with_the_space_needed_and_keeps_the_previous_checkpoint(single_report):
    got = single_report[0]["disk_full"]
    if isinstance(got, str):
        pytest.skip(got)
    for case in ("pre_check", "mid_write"):
        assert "checkpoints" in got[case] and " is free" in got[case] and "needs about" in got[case], got[case]
        assert got[case + "_dirs"] == ["latest", "step_00000001"], got  # nothing half-written left behind
    assert got["pre_check"].startswith("not enough space in ") and "Nothing was written" in got["pre_check"]
    assert got["mid_write"].startswith("no space left in ") and "step_00000001 is intact" in got["mid_write"]
    assert (got["step"], got["weights"]) == (1, True)


@pytest.mark.slow
def test_a_rank_killed_between_the_ranks_files_leaves_no_loadable_half(tmp_path, clean_shm):
    from conftest import dist_env, torchrun_cmd

    cmd = [a.replace("--max-restarts=0", "--max-restarts=1") for a in torchrun_cmd(2, __file__, "ranks", str(tmp_path))]
    proc = subprocess.run(cmd, cwd=REPO, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert "rank_00000.pt" in report["left"] and "rank_00001.pt" not in report["left"], report
    assert "client_state.pt" not in report["left"] and "manifest.json" not in report["left"], report
    assert (report["step"], report["weights"]) == (1, True)


@pytest.mark.slow
def test_starting_over_on_a_directory_with_checkpoints_is_refused(single_report):
    assert single_report[0]["start_over"].startswith("checkpoint.resume is false but ")
    assert "holds checkpoints of an earlier run (up to step_00000001)" in single_report[0]["start_over"]


@pytest.mark.slow
def test_crafted_pickles_in_a_checkpoint_are_refused_and_never_run(single_report):
    report = single_report[0]
    assert report["code_ran"] is False
    for key, name in (("evil_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"),
                      ("evil_rank_00000.pt", "rank_00000.pt"),
                      ("evil_no_manifest", "optim_states.pt")):
        assert report[key].startswith("checkpoint file ") and name in report[key], report[key]
        assert "was refused: it names io.open" in report[key] and "allowlist" not in report[key], report[key]


if __name__ == "__main__":
    {"single": single, "ranks": ranks}[sys.argv[1]](sys.argv[2])
