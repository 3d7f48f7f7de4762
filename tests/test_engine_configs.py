"""The DeepSpeed configurations the real recipes use, each resumed mid-run on 2 gloo ranks: the
resumed steps' losses (and in-loop evaluation figures) equal the uninterrupted run's exactly.

Pairwise coverage over a small table instead of the full product (5 rows instead of 48):

| row     | ZeRO | precision | overlap_comm | activation ckpt | accumulation | in-loop eval | like          |
|---------|------|-----------|--------------|-----------------|--------------|--------------|---------------|
| b32     | 1    | bf16      | yes          | no              | 1            | no           | B/32 recipe   |
| b16     | 2    | bf16      | no           | yes             | 2            | no           | B/16, L/14    |
| z3_eval | 3    | bf16      | yes          | no              | 2            | every 2      | ZeRO-3 + eval |
| z3_ac   | 3    | fp32      | no           | yes             | 1            | no           |               |
| z1_acc  | 1    | fp32      | no           | yes             | 2            | no           |               |

(ZeRO-2 fp32 without the rest is the demo recipe: tests/test_checkpoint.py, tests/test_demo.py.)
To keep CI short, one torchrun launch trains every row for 4 steps (a checkpoint every 2), and a
second launch resumes each row from its step-2 checkpoint, copied into a fresh run directory: the
resumed process never saw the row's first two steps; all it has is the checkpoint.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import DEMO_RECIPE, loss_log

ROWS = {
    "b32": ["parallel.zero_stage=1", "parallel.precision=bf16", "parallel.overlap_comm=true"],
    "b16": ["parallel.zero_stage=2", "parallel.precision=bf16", "model.activation_checkpointing=true",
            "train.accumulation_steps=2"],
    "z3_eval": ["parallel.zero_stage=3", "parallel.precision=bf16", "parallel.overlap_comm=true",
                "train.accumulation_steps=2", "eval.zeroshot.0.every_steps=2", "eval.zeroshot.0.batch_size=90"],
    "z3_ac": ["parallel.zero_stage=3", "parallel.precision=fp32", "model.activation_checkpointing=true"],
    "z1_acc": ["parallel.zero_stage=1", "parallel.precision=fp32", "model.activation_checkpointing=true",
               "train.accumulation_steps=2"],
}
STEPS, EVERY = 4, 2


def overrides(row: str, data: Path) -> list[str]:
    common = [f"data.streams=[{{remote: {data / 'train'}}}]", "data.batch_size=8", f"train.steps={STEPS}",
              f"checkpoint.every_steps={EVERY}", "logging.progress_bar=false", "logging.tensorboard=false",
              "logging.every_steps=1"]
    if "eval.zeroshot.0.every_steps=2" in ROWS[row]:
        common += [f"eval.zeroshot.0.data={data / 'heldout'}", f"eval.zeroshot.0.classes={data / 'zeroshot.json'}",
                   "eval.zeroshot.0.num_workers=0"]
    else:
        common.append("eval.zeroshot=[]")
    return common + ROWS[row]


def worker(root: str, data: str) -> None:
    """Every row in turn, in this one process (per rank): a fresh Trainer each, as train.py builds it."""
    from rwkvclip_dist.parallel.launch_env import detect_launch_env
    from rwkvclip_dist.training.loop import start_run
    from rwkvclip_dist.training.recipe import load_recipe

    launch = detect_launch_env()
    for row in ROWS:
        recipe = load_recipe(DEMO_RECIPE, overrides(row, Path(data)))
        start_run(recipe, Path(root) / row, launch).run()


def _copy_mid_run_checkpoint(reference: Path, resumed: Path) -> None:
    tag = f"step_{EVERY:08d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text(tag + "\n")


@pytest.mark.slow
def test_recipe_configurations_resume_mid_run_to_the_same_losses(tmp_path, demo_data, clean_shm):
    from conftest import dist_env, run_checked, launch_cmd

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_checked(launch_cmd(2, __file__, str(reference), str(demo_data)), timeout=900, env=dist_env())
    for row in ROWS:
        _copy_mid_run_checkpoint(reference / row, resumed / row)
    run_checked(launch_cmd(2, __file__, str(resumed), str(demo_data)), timeout=900, env=dist_env())

    for row in ROWS:
        expected = {r["step"]: r["loss"] for r in loss_log(reference / row)}
        assert sorted(expected) == list(range(1, STEPS + 1)), row
        got = {r["step"]: r["loss"] for r in loss_log(resumed / row)}
        assert got == {s: expected[s] for s in range(EVERY + 1, STEPS + 1)}, (row, got, expected)
        ref_metrics = json.loads((reference / row / "metrics.json").read_text())
        metrics = json.loads((resumed / row / "metrics.json").read_text())
        assert metrics["resumed_from_step"] == EVERY and metrics["final_loss"] == ref_metrics["final_loss"], row
        # The in-loop evaluation: step 2's figures come back from the checkpoint, step 4's are
        # recomputed from the resumed weights and must be the same.
        assert metrics["evals"] == ref_metrics["evals"], row
        if row == "z3_eval":
            assert sorted(metrics["evals"], key=int) == ["2", "4"] and metrics["zeroshot_n"] == 360


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
