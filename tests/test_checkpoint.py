"""A rank SIGKILLed mid-run, then a relaunch: the resumed losses equal the uninterrupted run's. (Saves
cut off at every stage, damaged files, full disks and crafted pickles: tests/test_checkpoint_faults.py.)"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import REPO, loss_log, rank_processes, train_args


@pytest.mark.slow
def test_sigkill_one_rank_then_resume_gives_the_uninterrupted_losses(tmp_path, demo_data, reference_losses,
                                                                     clean_shm):
    from conftest import REFERENCE_STEPS, dist_env, launch_cmd, run_checked, torchrun_cmd

    steps, expected = REFERENCE_STEPS, reference_losses
    run = tmp_path / "interrupted"
    cmd = torchrun_cmd(2, *train_args(run, demo_data, *steps))
    launcher = subprocess.Popen(cmd, cwd=REPO, env=dist_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.time() + 240
    while len(loss_log(run)) < 7 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = rank_processes(launcher)
    assert 1 in ranks, f"rank 1 not found (launcher exit {launcher.poll()}): {launcher.stderr.read()[-3000:]}"
    ranks[1].send_signal(signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    killed_at = len(loss_log(run))
    assert killed_at < 12, "the run finished before the kill; the test did not interrupt it"
    latest = (run / "checkpoints" / "latest").read_text().strip()

    run_checked(launch_cmd(2, *train_args(run, demo_data, *steps)), timeout=300, env=dist_env())
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert latest == f"step_{resumed:08d}" and resumed in (6, 9)
    after = loss_log(run)[killed_at:]
    assert [r["step"] for r in after] == list(range(resumed + 1, 13))
    for record in after:
        assert record["loss"] == expected[record["step"]], (record, expected[record["step"]])
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000009", "step_00000012"]  # keep_last=2
