"""The metrics logger (``training/metrics.py``): one strict JSON line per step in ``loss_log.jsonl``
on rank 0, window averages every N steps (and at the last), nothing written by other ranks."""
from __future__ import annotations

import math

from rwkvclip_dist.training.metrics import LoggingSection, TrainLogger


def _logger(run_dir, is_main: bool = True) -> TrainLogger:
    section = LoggingSection(every_steps=2, tensorboard=False, progress_bar=False, peak_flops_per_device=1e12)
    return TrainLogger(section, run_dir, is_main=is_main, total_steps=5, start_step=0, world_size=2,
                       flops_per_sample=1e9, tokens_per_sample=100)


def _step(logger: TrainLogger, step: int, loss: float, skipped: bool = False, masked: int = 0):
    return logger.log_step(step, loss=loss, lr=1e-3, logit_scale=2.0, grad_norm=0.5, global_samples=8,
                           data_wait=0.0, skipped=skipped, masked=masked)


def test_every_step_is_logged_and_windows_average_the_finite_losses(tmp_path):
    logger = _logger(tmp_path)
    emitted = [_step(logger, 1, 1.0), _step(logger, 2, 3.0), _step(logger, 3, math.nan, skipped=True),
               _step(logger, 4, 5.0, masked=2), _step(logger, 5, 7.0)]
    logger.close()
    assert [e is not None for e in emitted] == [False, True, False, True, True]  # every 2 steps, and the last
    assert [e["train/loss"] for e in emitted if e] == [2.0, 5.0, 7.0]  # NaN left out of the window
    assert emitted[1]["perf/mfu"] > 0 and emitted[1]["train/grad_norm"] == 0.5



def test_other_ranks_write_nothing(tmp_path):
    logger = _logger(tmp_path / "run", is_main=False)
    assert _step(logger, 2, 1.0) is None
    logger.message("not shown")
    logger.close()
    assert not (tmp_path / "run").exists()
