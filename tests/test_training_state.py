"""Run state and random streams (``training/state.py``, ``training/rng.py``): what ``TrainState``
counts, that its state survives a checkpoint file read as data only, and that a captured RNG state
replays every generator's draws exactly."""
from __future__ import annotations

import io
import logging
import math
import random

import numpy as np
import torch

from rwkvclip_dist.training import rng
from rwkvclip_dist.training.state import TrainState


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as the checkpoint manager reads it


def test_advance_counts_steps_samples_and_the_non_finite_run():
    state = TrainState()
    state.advance(2.5, True, samples=8, masked=1)
    state.advance(math.nan, False, samples=8, masked=0)
    state.advance(math.inf, False, samples=8, masked=2)
    assert (state.step, state.samples, state.samples_masked, state.nonfinite_in_a_row) == (3, 24, 3, 2)
    assert state.last_finite_loss == 2.5  # a skipped step keeps the last finite loss
    state.advance(1.5, True, samples=8, masked=0)
    assert (state.nonfinite_in_a_row, state.last_finite_loss) == (0, 1.5)


def test_the_state_and_every_random_stream_come_back_from_a_checkpoint_file():
    rng.seed_all(3)
    np.random.randn()  # a cached Gaussian: numpy's state has one more part to keep
    state = TrainState(step=7, samples=56, evals={"5": {"top1": 0.5}})
    state.advance(0.75, True, samples=8, masked=0)
    saved = _through_a_file(state.state_dict())
    expected = _draws()
    rng.seed_all(99)
    resumed = TrainState()
    resumed.load_state_dict(saved)
    assert resumed == state
    assert _draws() == expected


def test_a_checkpoint_without_newer_counters_loads_with_their_defaults():
    saved = TrainState(step=4, samples=32).state_dict()
    del saved["samples_masked"], saved["last_finite_loss"]
    resumed = TrainState()
    resumed.load_state_dict(saved)
    assert (resumed.step, resumed.samples, resumed.samples_masked) == (4, 32, 0)
    assert math.isnan(resumed.last_finite_loss)


def test_another_ranks_state_gives_the_counters_but_not_the_random_streams(caplog):
    rng.seed_all(1)
    saved = {**TrainState(step=2, samples=16).state_dict(), "rank": 5}
    rng.seed_all(2)
    expected = _draws()
    rng.seed_all(2)
    resumed = TrainState()
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(saved)
    assert resumed.step == 2 and _draws() == expected
    assert "resumes from rank 5's counters" in caplog.text


def test_torch_streams_replay_a_micro_batch():
    torch.manual_seed(0)
    streams = rng.torch_streams()
    first = torch.rand(4)
    rng.set_torch_streams(streams)
    assert torch.equal(torch.rand(4), first)
