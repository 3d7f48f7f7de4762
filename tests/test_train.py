"""End-to-end runs of rwkvclip_dist/train.py: SIGTERM under ZeRO-3, the non-finite-loss stop on
the single-process debug path, and bf16 without ZeRO (stage 0) with a resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, loss_log, rank_processes, train_args


@pytest.mark.slow
def test_sigterm_makes_every_rank_save_and_exit_zero_under_zero3(tmp_path, demo_data, clean_shm):
    from conftest import dist_env, torchrun_cmd

    run = tmp_path / "run"
    cmd = torchrun_cmd(2, *train_args(run, demo_data, "train.steps=1000", "checkpoint.every_steps=0",
                                      "parallel.zero_stage=3"))
    launcher = subprocess.Popen(cmd, cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    deadline = time.time() + 240
    while len(loss_log(run)) < 3 and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    ranks = rank_processes(launcher)
    assert sorted(ranks) == [0, 1], f"ranks not found (launcher exit {launcher.poll()})"
    # Slurm signals every task of the step; one rank getting it first must still stop them all.
    ranks[1].send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, output[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "preempted" and 3 <= metrics["steps"] < 1000
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{metrics['steps']:08d}"
    assert [r["step"] for r in loss_log(run)] == list(range(1, metrics["steps"] + 1))
    assert "stop signal received" in output


@pytest.mark.slow
def test_nonfinite_losses_skip_steps_then_stop_with_a_clear_message(tmp_path, demo_data, clean_shm):
    """Plain ``python train.py``: the single-process debug path (world size 1)."""
    from conftest import dist_env

    run = tmp_path / "run"
    args = train_args(run, demo_data, "train.steps=20", "train.max_nonfinite_steps=3",
                      "model.overrides={init_logit_scale: .nan}")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=dist_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    assert "non-finite for 3 steps in a row" in proc.stderr
    records = loss_log(run)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["skipped"] for r in records)
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_bf16_without_zero_trains_and_resumes(tmp_path, demo_data, clean_shm):
    """2 gloo ranks, DeepSpeed bf16 with ZeRO stage 0 (plain data parallel): finite losses, a
    checkpoint, and a second launch that resumes from it instead of starting over."""
    import math

    from conftest import dist_env, torchrun_cmd

    run = tmp_path / "run"
    common = ("parallel.zero_stage=0", "parallel.precision=bf16", "checkpoint.every_steps=2")
    first = subprocess.run(torchrun_cmd(2, *train_args(run, demo_data, "train.steps=4", *common)), cwd=REPO,
                           env=dist_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    second = subprocess.run(torchrun_cmd(2, *train_args(run, demo_data, "train.steps=6", *common)), cwd=REPO,
                            env=dist_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records = loss_log(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # resumed at 5, not restarted at 1
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
