"""Checkpoints that resume exactly, and saves that cannot corrupt the previous checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, loss_log, rank_processes, train_args


@pytest.mark.slow
def test_sigkill_one_rank_then_resume_gives_the_uninterrupted_losses(tmp_path, demo_data, reference_losses,
                                                                     clean_shm):
    from conftest import REFERENCE_STEPS, dist_env, run_checked, torchrun_cmd

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

    run_checked(torchrun_cmd(2, *train_args(run, demo_data, *steps)), timeout=300, env=dist_env())
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert latest == f"step_{resumed:08d}" and resumed in (6, 9)
    after = loss_log(run)[killed_at:]
    assert [r["step"] for r in after] == list(range(resumed + 1, 13))
    for record in after:
        assert record["loss"] == expected[record["step"]], (record, expected[record["step"]])
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000009", "step_00000012"]  # keep_last=2


def worker(phase: str, directory: str) -> None:
    """Single-process DeepSpeed engine; ``save`` dies by SIGKILL half-way through its second save."""
    import torch

    from rwkvclip_dist import create_model
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.parallel.engine import ParallelSection, create_engine, deepspeed_config, init_distributed
    from rwkvclip_dist.parallel.launch_env import detect_launch_env
    from rwkvclip_dist.training.state import TrainState

    init_distributed(detect_launch_env(), "gloo")
    torch.manual_seed(0)
    model = create_model("tiny")
    engine = create_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), deepspeed_config(
        ParallelSection(zero_stage=2, precision="fp32"), micro_batch=2, accumulation_steps=1, world_size=1,
        grad_clip=1.0))
    manager = CheckpointManager(directory, keep_last=3)
    snapshot = Path(directory).parent / "step1_weights.pt"
    if phase == "save":
        manager.save(engine, 1, {"train_state": TrainState(step=1, samples=2)}, {"step": 1})
        torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, snapshot)
        for p in engine.module.parameters():
            p.data.add_(1.0)  # a changed model, so a load of step 2's weights would be detectable
        real_save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            # Fault injection standing in for a node failure: the process dies right after the
            # first file of the second checkpoint is on disk.
            real_save(obj, f, *args, **kwargs)
            if "step_00000002" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        manager.save(engine, 2, {"train_state": TrainState(step=2, samples=4)}, {"step": 2})
        raise AssertionError("the save was expected to be killed")
    state = TrainState()
    record = manager.load(engine, {"train_state": state})
    weights = torch.load(snapshot)
    same = all(torch.equal(v.reshape(-1), weights[k].reshape(-1)) for k, v in engine.module.state_dict().items())
    print(json.dumps({"record": record, "step": state.step, "samples": state.samples, "same_weights": same}))


@pytest.mark.slow
def test_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path, clean_shm):
    from conftest import dist_env

    directory = tmp_path / "checkpoints"
    killed = subprocess.run([sys.executable, __file__, "save", str(directory)], cwd=REPO, env=dist_env(),
                            capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (directory / "step_00000002").is_dir() and (directory / "latest").read_text().strip() == "step_00000001"
    assert not (directory / "step_00000002" / "client_state.pt").exists()
    loaded = subprocess.run([sys.executable, __file__, "load", str(directory)], cwd=REPO, env=dist_env(),
                            capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result == {"record": {"step": 1}, "step": 1, "samples": 2, "same_weights": True}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
