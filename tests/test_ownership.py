"""One live trainer per run directory, and no rank training on after its launcher is gone.

The scenario seen on a real machine: torchrun starts each worker in a session of its own, so killing
the launcher's process group (the OOM killer, a careless ``kill -9 -PGID``) leaves the ranks running
as orphans, and a restarted job trained beside them into the same checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time

import pytest

from conftest import PYTHON, REPO, dist_env, loss_log, rank_processes, train_args, wait_for
from rwkvclip_dist.training.ownership import LOCK_FILE, RunDirectoryBusy, RunLock


def _python(code: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", textwrap.dedent(code)], cwd=REPO, env=dist_env(), text=True, **popen)


def test_the_lock_names_its_live_holder_and_a_killed_holder_does_not_keep_it(tmp_path):
    holder = _python(f"""
        import time
        from rwkvclip_dist.training.ownership import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another trainer \(host {socket.gethostname()}, "
                                                   rf"pid {holder.pid}, job"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no handler, no clean-up
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"pid={os.getpid()}\n" in (tmp_path / LOCK_FILE).read_text()
    lock.release()


def test_a_lock_left_to_the_children_of_a_dead_holder_is_waited_for(tmp_path):
    """Forked data-loader workers share the holder's lock until they notice it died; the successor
    waits for them instead of refusing (the holder's pid, written in the file, is dead)."""
    holder = _python(f"""
        import os, time
        from rwkvclip_dist.training.ownership import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        if os.fork() == 0:
            time.sleep(3)   # a worker outliving its parent for a moment
            os._exit(0)
        os._exit(0)
    """)
    holder.wait()
    started = time.monotonic()
    RunLock(tmp_path).acquire()
    assert 1 < time.monotonic() - started < 30


WATCHED_RANK = """
import sys, time
from rwkvclip_dist.training.ownership import LauncherWatch
watch, plain = LauncherWatch("torchrun"), LauncherWatch("single")
print("before", watch.launcher_gone(), flush=True)
sys.stdin.readline()          # the launcher exits once this returns
deadline = time.monotonic() + 20
while not watch.launcher_gone() and time.monotonic() < deadline:
    time.sleep(0.05)
print("after", watch.launcher_gone(), plain.launcher_gone(), flush=True)
"""


def test_the_launcher_watch_notices_a_vanished_parent():
    launcher = _python(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {WATCHED_RANK!r}], stdin=subprocess.PIPE, stdout=sys.stdout)
        print(child.pid, flush=True)
        sys.stdin.readline()
        child.stdin.write(b"go\\n")
        child.stdin.flush()
    """, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    launcher.stdout.readline()
    assert launcher.stdout.readline().strip() == "before False"
    launcher.stdin.write("go\n")
    launcher.stdin.flush()
    assert launcher.wait(timeout=30) == 0
    assert launcher.stdout.readline().strip() == "after True False"


@pytest.mark.slow
def test_orphans_of_a_killed_torchrun_save_and_stop_and_a_second_trainer_is_refused(tmp_path, demo_data, clean_shm):
    from conftest import torchrun_cmd

    run = tmp_path / "run"
    args = train_args(run, demo_data, "train.steps=1000", "checkpoint.every_steps=0")
    with open(tmp_path / "first.log", "w") as log:
        # A session of its own, as under a batch script: the test can kill the launcher's group.
        first = subprocess.Popen(torchrun_cmd(2, *args), cwd=REPO, env=dist_env(), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: len(loss_log(run)) >= 2, 300, "two steps", first)
    ranks = rank_processes(first)
    recipe_before = (run / "recipe.yaml").read_bytes()

    # 1. A second trainer on the same run directory is refused, before it writes anything.
    second = subprocess.run(torchrun_cmd(2, *args), cwd=REPO, env=dist_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode != 0
    assert (f"{run} is in use by another trainer (host {socket.gethostname()}, pid {ranks[0].pid}"
            in second.stderr), second.stderr[-3000:]
    assert (run / "recipe.yaml").read_bytes() == recipe_before

    # 2. The launcher's process group is killed; its ranks, now orphans, save and stop.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    for proc in ranks.values():
        wait_for(lambda: not proc.is_running() or proc.status() == "zombie", 180, f"orphan rank {proc.pid} to stop")
    stopped_after = time.monotonic() - killed_at
    metrics = json.loads((run / "metrics.json").read_text())
    saved = metrics["steps"]
    assert metrics["status"] == "launcher_lost"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved:08d}"
    assert [r["step"] for r in loss_log(run)] == list(range(1, saved + 1))
    assert "is gone: saved step" in (tmp_path / "first.log").read_text()

    # 3. With the orphans gone, a new job takes the directory over and resumes where they saved.
    from conftest import run_checked

    run_checked(torchrun_cmd(2, *train_args(run, demo_data, f"train.steps={saved + 1}",
                                            "checkpoint.every_steps=0")), timeout=300)
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == saved
    print(f"\norphans saved step {saved} and stopped {stopped_after:.1f} s after their launcher was killed")


def test_the_run_directories_are_released_however_the_run_ends(tmp_path):
    """``run_directories_locked`` holds the locks for its block and releases them when the block
    raises (a failed build, a crash in the loop), not only after a clean end."""
    from rwkvclip_dist.training.ownership import run_directories_locked

    with pytest.raises(KeyError):
        with run_directories_locked([tmp_path / "run", tmp_path / "ckpt"], is_main=True):
            for directory in ("run", "ckpt"):
                with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()}"):
                    RunLock(tmp_path / directory).acquire()
            raise KeyError("the run failed")
    for directory in ("run", "ckpt"):
        lock = RunLock(tmp_path / directory)
        lock.acquire()
        lock.release()
