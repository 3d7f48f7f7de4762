"""Resuming a ZeRO checkpoint on another number of data-parallel ranks, optimizer included
(checkpoint/reshard.py through DeepSpeed's universal checkpoint): with the same global batch the
losses after the change equal the uninterrupted run's within 1e-4 (only the reduction order differs).

Each case branches real runs: a checkpoint of one run is copied into a fresh run directory (with the
loss log up to its step) and resumed there on another world size, so one uninterrupted run serves
as the reference for every branch taken from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import dist_env, loss_log, launch_cmd, run_checked, train_args

STEPS = ("train.steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "data.num_canonical_nodes=2")
GLOBAL_BATCH = 32
UNIVERSAL_LINE = "loading it through DeepSpeed's universal checkpoint"


def _train(run: Path, data: Path, ranks: int, *extra: str, batch: int | None = None) -> str:
    """One run on ``ranks`` ranks with the global batch kept at GLOBAL_BATCH (or ``batch`` per rank)."""
    per_rank = batch or GLOBAL_BATCH // ranks
    proc = run_checked(launch_cmd(ranks, *train_args(run, data, *STEPS, *extra, f"data.batch_size={per_rank}")),
                       timeout=600, env=dist_env())
    return proc.stdout + proc.stderr


def _branch(source: Path, step: int, target: Path) -> None:
    """``target``: a run directory holding only ``source``'s checkpoint at ``step`` and its losses."""
    tag = f"step_{step:08d}"
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag,
                    ignore=shutil.ignore_patterns("universal"))
    (target / "checkpoints" / "latest").write_text(tag + "\n")
    rows = [json.dumps(r) for r in loss_log(source) if r["step"] <= step]
    (target / "loss_log.jsonl").write_text("\n".join(rows) + "\n")


def _assert_same_losses(run: Path, reference: Path, after: int) -> None:
    expected = {r["step"]: r["loss"] for r in loss_log(reference)}
    resumed = [r for r in loss_log(run) if r["step"] > after]
    assert [r["step"] for r in resumed] == list(range(after + 1, 7))
    for row in resumed:
        assert abs(row["loss"] - expected[row["step"]]) < 1e-4, (row, expected[row["step"]])


def _world_size_of(run: Path, step: int) -> int:
    from rwkvclip_dist.checkpoint.manager import CheckpointManager

    return CheckpointManager(run / "checkpoints").read_record(f"step_{step:08d}").world_size


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_to_one_and_back_keeps_the_losses(tmp_path, demo_data, zero_stage, clean_shm):
    stage = f"parallel.zero_stage={zero_stage}"
    reference = tmp_path / "reference"
    _train(reference, demo_data, 2, stage)

    down = tmp_path / "down"
    _branch(reference, 2, down)
    output = _train(down, demo_data, 1, stage)
    assert output.count(UNIVERSAL_LINE) == 1 and "data parallel 2), this run has 1" in output
    assert "same global batch (32)" in output
    assert _world_size_of(down, 2) == 2 and _world_size_of(down, 4) == 1
    _assert_same_losses(down, reference, 2)

    up = tmp_path / "up"
    _branch(down, 4, up)
    output = _train(up, demo_data, 2, stage)
    assert output.count(UNIVERSAL_LINE) == 1 and "data parallel 1), this run has 2" in output
    _assert_same_losses(up, reference, 4)

    if zero_stage == 1:
        # Another global batch: the run continues and says so.
        other = tmp_path / "other_batch"
        _branch(reference, 4, other)
        output = _train(other, demo_data, 1, stage, batch=16)
        assert "the global batch changes from 32 to 16 samples" in output
        assert json.loads((other / "metrics.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_four_ranks_to_two_under_tensor_parallelism(tmp_path, demo_data, clean_shm):
    """Tensor parallel 2 throughout; the data-parallel size goes from 2 to 1 (4 ranks to 2)."""
    extra = ("parallel.tensor_parallel=2", "parallel.zero_stage=1")
    reference = tmp_path / "reference"
    # Under tensor parallelism each TP pair holds the same samples: the global batch is per-rank x DP.
    _train(reference, demo_data, 4, *extra, batch=16)
    fewer = tmp_path / "fewer"
    _branch(reference, 2, fewer)
    output = _train(fewer, demo_data, 2, *extra, batch=32)
    assert output.count(UNIVERSAL_LINE) == 1 and "written on 4 rank(s) (data parallel 2)" in output
    _assert_same_losses(fewer, reference, 2)
