"""``eval.use_ema`` on 2 gloo ranks under ZeRO-2: the in-loop evaluation scores the EMA weights (equal to
an evaluation of the EMA that ``tools/convert_checkpoint.py from-zero --ema`` exports), and swapping
the EMA in and out for the evaluation leaves training unchanged (the same losses as without it).

The run with ``eval.use_ema`` is shared with tests/test_ema.py and tests/test_wandb.py (tests/shared_runs.py):
it also logs to wandb and is stopped after step 2 and resumed; the run without it is uninterrupted, so
the bitwise comparison also holds the resume to being exact."""
from __future__ import annotations

import json

import pytest

from conftest import digits_zeroshot, loss_log
from shared_runs import ZERO2_GROUP, ZERO2_STEPS
from tool_loader import tool_main

STEPS = ZERO2_STEPS


@pytest.fixture(scope="module")
def runs(ema_zero2_run, ema_eval_baseline):
    return {True: ema_zero2_run, False: ema_eval_baseline}


def _evals(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["evals"]


@pytest.mark.slow
@pytest.mark.xdist_group(ZERO2_GROUP)
def test_training_is_unchanged_by_evaluating_the_ema(runs):
    with_ema, without = loss_log(runs[True]), loss_log(runs[False])
    assert [r["step"] for r in with_ema] == list(range(1, STEPS + 1))
    # Bitwise: the trained weights are put back exactly, the eval at step EVAL_EVERY is between steps of
    # one launch (the resumed one: ZERO2_STOP < EVAL_EVERY < STEPS).
    assert [r["loss"] for r in with_ema] == [r["loss"] for r in without]


@pytest.mark.slow
@pytest.mark.xdist_group(ZERO2_GROUP)
def test_logged_eval_is_an_evaluation_of_the_exported_ema(runs, demo_data, tmp_path):
    from rwkvclip_dist.pretrained import load_model

    checkpoints = runs[True] / "checkpoints"
    out = tmp_path / "ema.safetensors"
    assert tool_main("convert_checkpoint")(["from-zero", str(checkpoints), str(out), "--ema",
                                            "--tag", f"step_{STEPS:08d}"]) == 0
    expected = digits_zeroshot(load_model(None, out), demo_data)
    logged = _evals(runs[True])[str(STEPS)]  # the evaluation at the end, after the last EMA update
    assert logged.keys() == expected.keys()
    for key in expected:  # accuracies over 360 images: a 1e-6 slack for summation order only
        assert logged[key] == pytest.approx(expected[key], abs=1e-6), key
    # ... and not an evaluation of the trained weights, which the run without use_ema logged.
    assert _evals(runs[False])[str(STEPS)] != logged


def test_use_ema_needs_an_ema_and_zero_1_or_2():
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    with pytest.raises(ConfigError, match="eval.use_ema.*train.ema.enabled"):
        load_recipe(DEMO_RECIPE, ["eval.use_ema=true"], check_paths=False)
    with pytest.raises(ConfigError, match="eval.use_ema.*zero_stage 1 or 2"):
        load_recipe(DEMO_RECIPE, ["eval.use_ema=true", "train.ema.enabled=true", "parallel.zero_stage=3"],
                    check_paths=False)
