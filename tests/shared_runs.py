"""Training runs shared by several test files, some carrying several features at once, so that the
tests of each feature share one launch instead of paying their own start-up (registered as session
fixtures by conftest.py).

Each run's users carry the same ``xdist_group`` (``ZERO2_GROUP``, ``SIGLIP_GROUP``, ``SOURCE_GROUP``), so
that under pytest-xdist the run is made once, in one worker (tests/scheduling.py). A test that compares a run against one
WITHOUT its feature still gets that other run (:func:`ema_eval_baseline`); a shared run only adds
features that its other users' claims do not depend on (wandb's files, the EMA, the in-loop
evaluation of the EMA).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import dist_env, launch_cmd, run_checked, train_args

# The EMA (tests/test_ema.py) as the ZeRO-2 run's and the SigLIP run's: every step checkpointed and kept.
EMA = ("train.ema.enabled=true", "train.ema.decay=0.6", "train.ema.warmup=true", "checkpoint.every_steps=1",
       "checkpoint.keep_last=10", "optimizer.lr=1e-2")
ZERO2_STEPS = 4
ZERO2_STOP = 2  # the first launch stops here, the second resumes to ZERO2_STEPS
WANDB = "logging.wandb={project: rwkvclip-test, mode: offline}"
# The learned SigLIP bias (tests/test_learned_bias_and_soups.py) under ZeRO-3 with accumulation and wsd;
# its lr (1e-2) and checkpoints (every step) are EMA's.
SIGLIP_STEPS = 3
SIGLIP = ("loss.kind=siglip", "model.overrides={text.pool: masked_mean, init_logit_bias: -10.0}",
          "parallel.zero_stage=3", "train.accumulation_steps=2", f"train.steps={SIGLIP_STEPS}",
          "schedule.kind=wsd", "schedule.warmup_fraction=0", "schedule.cooldown_from=1")
# A constant lr after a short warm-up: 60 steps take the tiny model well below a fresh one's loss.
SOURCE = ("train.steps=60", "checkpoint.every_steps=0", "schedule.min_lr_ratio=1.0", "schedule.warmup_fraction=0.05")
# The xdist_group of each shared run's users (named after its fixture).
ZERO2_GROUP, SIGLIP_GROUP, SOURCE_GROUP = "ema_zero2_run", "siglip_ema_run", "source_run"


# Between steps of the resumed launch (so that the trained weights put back after it train step 4), and
# at the end.
EVAL_EVERY = 3


def digits_eval(demo_data: Path, use_ema: bool) -> tuple[str, str]:
    """An in-loop zero-shot evaluation every EVAL_EVERY steps and at the end, of the EMA with ``use_ema``."""
    return (f"eval.zeroshot=[{{name: digits, data: {demo_data / 'heldout'}, classes: "
            f"{demo_data / 'zeroshot.json'}, every_steps: {EVAL_EVERY}, batch_size: 128, num_workers: 0}}]",
            f"eval.use_ema={str(use_ema).lower()}")


def _zero2_args(demo_data: Path, use_ema: bool) -> tuple[str, ...]:
    # A constant lr: a schedule's lr depends on train.steps, which the stopped launch sets lower.
    return ("parallel.zero_stage=2", "schedule.kind=constant", *EMA, *digits_eval(demo_data, use_ema))


@pytest.fixture(scope="session")
def ema_zero2_run(demo_data, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2: an EMA evaluated in the loop (``eval.use_ema``), wandb offline, stopped after
    step ZERO2_STOP and resumed to ZERO2_STEPS. For tests/test_ema.py (the EMA continues exactly across
    the resume), tests/test_wandb.py (the resume continues the same wandb run) and tests/test_ema_eval.py."""
    root = tmp_path_factory.mktemp("ema_zero2")
    run = root / "run"
    # wandb's own settings and caches in the test's folder, not the user's home.
    env = dist_env(WANDB_CONFIG_DIR=str(root / "config"), WANDB_CACHE_DIR=str(root / "cache"),
                   WANDB_DATA_DIR=str(root / "data"))
    for steps in (ZERO2_STOP, ZERO2_STEPS):
        args = train_args(run, demo_data, *_zero2_args(demo_data, True), WANDB, f"train.steps={steps}")
        run_checked(launch_cmd(2, *args), timeout=600, env=env)
    return run


@pytest.fixture(scope="session")
def ema_eval_baseline(demo_data, tmp_path_factory) -> Path:
    """:func:`ema_zero2_run` without ``eval.use_ema`` (its evaluations score the trained weights) and
    uninterrupted, with the same training otherwise (wandb only writes files)."""
    run = tmp_path_factory.mktemp("ema_eval_baseline") / "run"
    args = train_args(run, demo_data, *_zero2_args(demo_data, False), f"train.steps={ZERO2_STEPS}")
    run_checked(launch_cmd(2, *args), timeout=600)
    return run


@pytest.fixture(scope="session")
def siglip_ema_run(demo_data, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-3, SigLIP with a learned bias, accumulation, the wsd schedule and an EMA, every
    step checkpointed. For tests/test_learned_bias_and_soups.py and the ZeRO-3 case of tests/test_ema.py."""
    run = tmp_path_factory.mktemp("siglip") / "run"
    run_checked(launch_cmd(2, *train_args(run, demo_data, *SIGLIP, *EMA)), timeout=600)
    return run


@pytest.fixture(scope="session")
def source_run(demo_data, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2, 32 px, TP=1: trained weights that tests/test_finetune.py continues at 48 px and
    tests/test_tensor_parallel_finetune.py continues under TP=2."""
    run = tmp_path_factory.mktemp("source") / "run"
    run_checked(launch_cmd(2, *train_args(run, demo_data, *SOURCE)), timeout=600)
    return run
