"""A rank lost without warning: the survivors neither hang nor train on, and a restart resumes exactly.

- Launched the way ``srun`` launches (one process per rank, rank and world from SLURM_* variables, no
  agent watching them), rank 1 is frozen with SIGSTOP (what a node whose network vanished looks like:
  no socket is closed, nothing answers). Rank 0 must give up after ``parallel.timeout_s`` and exit 3
  with one line saying it lost a peer.
- Under ``torchrun --max-restarts=1``, rank 1 is SIGKILLed (no handler runs). The survivor exits at
  its next collective, the agent restarts both ranks, they resume from the newest complete checkpoint
  and the per-step losses equal an uninterrupted run's.
- Launched srun-style, rank 0 cannot prepare a checkpoint's directory: every rank learns it from rank
  0's broadcast and exits with the checkpoint status (1) and one line.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, REFERENCE_STEPS, dist_env, loss_log, rank_processes, train_args, wait_for

TIMEOUT_S = 10


@pytest.mark.parametrize("value", ["0", "-5", "1e9"])
def test_the_collective_timeout_is_checked_when_the_recipe_loads(value):
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.training.recipe import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"command line: parallel\.timeout_s: must be between 1 and 604800"):
        load_recipe(DEMO_RECIPE, [f"parallel.timeout_s={value}"])
    assert load_recipe(DEMO_RECIPE, check_paths=False).parallel.timeout_s == 1800


def _srun_style_ranks(run, data, world: int, *extra: str) -> list[subprocess.Popen]:
    from rwkvclip_dist.parallel.launch_env import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = dist_env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                       SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([PYTHON, *train_args(run, data, *extra)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_srun_style_survivor_of_a_frozen_peer_exits_after_the_collective_timeout(tmp_path, demo_data, clean_shm):
    run = tmp_path / "run"
    rank0, rank1 = _srun_style_ranks(run, demo_data, 2, "train.steps=1000", "checkpoint.every_steps=0",
                                     f"parallel.timeout_s={TIMEOUT_S}")
    try:
        wait_for(lambda: len(loss_log(run)) >= 2, 300, "two steps", rank0)
        rank1.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, stderr = rank0.communicate(timeout=TIMEOUT_S + 120)
        detected_after = time.monotonic() - frozen_at
    finally:
        rank1.kill()
        rank1.communicate()
        rank0.kill()
    lines = [line for line in stderr.splitlines() if "lost contact with a peer rank" in line]
    assert rank0.returncode == 3, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost contact") and "Traceback" not in stderr
    assert f"collective timeout {TIMEOUT_S} s" in lines[0] and "Timed out waiting" in lines[0]
    # The timeout plus a step and the exit; generous because the test machine's cores are shared.
    assert detected_after < TIMEOUT_S + 45, detected_after
    print(f"\nfrozen peer: rank 0 exited {detected_after:.1f} s after SIGSTOP (timeout {TIMEOUT_S} s)")


@pytest.mark.slow
def test_torchrun_restarts_after_a_sigkilled_rank_and_resumes_to_the_same_losses(tmp_path, demo_data,
                                                                                 reference_losses, clean_shm):
    from conftest import torchrun_cmd

    run = tmp_path / "run"
    cmd = [arg.replace("--max-restarts=0", "--max-restarts=1")
           for arg in torchrun_cmd(2, *train_args(run, demo_data, *REFERENCE_STEPS))]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    wait_for(lambda: len(loss_log(run)) >= 5, 300, "five steps", launcher)
    rank_processes(launcher)[1].send_signal(signal.SIGKILL)
    killed_at_step = len(loss_log(run))
    killed_at = time.monotonic()
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-5000:]
    assert "lost contact with a peer rank" in output  # the survivor's one line, before the restart
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert metrics["status"] == "completed" and 3 <= resumed <= killed_at_step and resumed % 3 == 0
    after = loss_log(run)[killed_at_step:]
    assert [r["step"] for r in after] == list(range(resumed + 1, 13))
    assert {r["step"]: r["loss"] for r in after} == {s: reference_losses[s] for s in range(resumed + 1, 13)}
    print(f"\nSIGKILL at step {killed_at_step}: restarted from step {resumed}, whole job done "
          f"{time.monotonic() - killed_at:.1f} s after the kill")


def test_a_save_refused_on_rank_0_stops_every_rank_with_the_checkpoint_status(tmp_path, demo_data, clean_shm):
    """Rank 0 cannot prepare the checkpoint's directory (a file is in its place) while rank 1 waits
    for rank 0's word: both ranks must stop at once with the checkpoint exit status (1) and one line,
    not rank 1 waiting out the collective timeout (before the fix rank 0 raised before the broadcast:
    a traceback on rank 0, and rank 1 waited until it noticed a lost peer). Launched srun-style: no
    agent kills the survivor."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001").write_text("not a checkpoint\n")
    started = time.monotonic()
    procs = _srun_style_ranks(run, demo_data, 2, "train.steps=1", "checkpoint.every_steps=0",
                              "parallel.timeout_s=600")
    try:
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - started
    assert [proc.returncode for proc in procs] == [1, 1], [err[-2000:] for _, err in outputs]
    for rank, (_, stderr) in enumerate(outputs):
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, (rank, stderr[-3000:])
        assert "cannot prepare checkpoint directory" in errors[0] and "step_00000001" in errors[0], errors
    assert elapsed < 240
