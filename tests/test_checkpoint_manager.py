"""The checkpoint manager in one process, without DeepSpeed where the engine's part is not what is
tested (a stand-in engine that records what it is asked): every failure is a ``CheckpointError``,
which the runner turns into exit status 1 with one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.checkpoint.manager import CLIENT_FILE, CheckpointManager, rank_file


class _Engine:
    """Stands in for DeepSpeed's engine: ``load_checkpoint`` answers as DeepSpeed does when it finds
    no files of its own (``(None, None)``) or with the path it loaded."""

    def __init__(self, loads: bool) -> None:
        self.loads, self.checkpoint_engine = loads, type("CheckpointEngine", (), {})()

    def load_checkpoint(self, directory: str, tag: str):
        return (f"{directory}/{tag}", {}) if self.loads else (None, None)


class _State:
    def __init__(self) -> None:
        self.loaded = None

    def state_dict(self) -> dict:
        return {"x": 1}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def _complete(directory: Path, step: int, states: dict) -> str:
    tag = f"step_{step:08d}"
    (directory / tag).mkdir(parents=True)
    torch.save({"step": step}, directory / tag / CLIENT_FILE)
    torch.save(states, directory / tag / rank_file(0))
    (directory / "latest").write_text(tag + "\n")
    return tag


def test_a_latest_naming_no_complete_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000007', which is not a complete checkpoint"):
        CheckpointManager(tmp_path).latest_tag()


def test_a_checkpoint_deepspeed_cannot_load_is_a_checkpoint_error(tmp_path):
    _complete(tmp_path, 3, {"train_state": {"x": 1}})
    with pytest.raises(CheckpointError, match=r"DeepSpeed could not load checkpoint .*step_00000003"):
        CheckpointManager(tmp_path).load(_Engine(loads=False), {"train_state": _State()})


def test_a_checkpoint_without_a_states_part_is_a_checkpoint_error(tmp_path):
    _complete(tmp_path, 3, {"train_state": {"x": 1}})
    state = _State()
    with pytest.raises(CheckpointError, match=r"holds no state for \['loader'\] \(it has \['train_state'\]\)"):
        CheckpointManager(tmp_path).load(_Engine(loads=True), {"train_state": state, "loader": _State()})
    assert CheckpointManager(tmp_path).load(_Engine(loads=True), {"train_state": state})["step"] == 3
    assert state.loaded == {"x": 1}
