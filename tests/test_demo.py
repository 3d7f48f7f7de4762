"""The demo recipe's golden loss curve (a shortened run on 2 ranks, ZeRO-2) and the files a run
leaves behind. The golden file holds the overrides it was made with; regenerate it after an
intentional change with ``python tests/test_demo.py --update-golden``."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, TRAIN

GOLDEN = REPO / "tests" / "golden" / "demo_digits_loss.json"
OVERRIDES = ["train.steps=10", "data.batch_size=16", "eval.zeroshot=[]", "checkpoint.every_steps=0",
             "logging.every_steps=5", "logging.progress_bar=false"]
# Same machine and library versions reproduce the curve bit for bit; other CPUs round differently.
RTOL = 2e-3


def run_short_demo(run_dir: Path, data: Path) -> list[float]:
    from conftest import dist_env, run_checked, torchrun_cmd

    cmd = torchrun_cmd(2, TRAIN, "--recipe", str(REPO / "recipes" / "demo_digits.yaml"), "--run-dir",
                       str(run_dir), f"data.streams=[{{remote: {data / 'train'}}}]", *OVERRIDES)
    run_checked(cmd, timeout=300, env=dist_env())
    records = [json.loads(line) for line in (run_dir / "loss_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records]


@pytest.mark.slow
def test_short_demo_run_follows_the_golden_loss_curve(tmp_path, demo_data, clean_shm):
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "golden file made with other overrides: regenerate it"
    losses = run_short_demo(tmp_path / "run", demo_data)
    assert losses == pytest.approx(golden["losses"], rel=RTOL)
    assert losses[-1] < losses[0]  # it learns

    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["status"] == "completed" and metrics["samples"] == 10 * 32
    assert metrics["final_loss"] == losses[-1] and metrics["samples_per_s"] > 0
    resolved = (run / "recipe.yaml").read_text()
    assert "batch_size: 16" in resolved and "zero_stage: 2" in resolved
    assert any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"


if __name__ == "__main__" and sys.argv[1:] == ["--update-golden"]:
    sys.path.insert(0, str(REPO / "tests"))
    from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(ensure_demo_data(str(Path(tmp) / "demo_digits")))
        curve = run_short_demo(Path(tmp) / "run", data)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"recipe": "recipes/demo_digits.yaml", "world_size": 2, "overrides": OVERRIDES,
                                  "losses": curve, "made_with": "python tests/test_demo.py --update-golden"},
                                 indent=1) + "\n")
    print(f"wrote {GOLDEN}: {curve}")
