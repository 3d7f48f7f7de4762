"""The checkpoint manager in one process, without DeepSpeed where the engine's part is not what is
tested (a stand-in engine that records what it is asked): every failure is a ``CheckpointError``,
which the runner turns into exit status 1 with one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.checkpoint.manager import CLIENT_FILE, CheckpointManager, rank_file
from rwkvclip_dist.checkpoint.record import RunRecord, check_resumable, installed_versions


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
    assert CheckpointManager(tmp_path).load(_Engine(loads=True), {"train_state": state}).step == 3
    assert state.loaded == {"x": 1}


def test_the_manager_saves_at_its_interval_the_last_step_and_when_forced(tmp_path):
    manager = CheckpointManager(tmp_path, every_steps=3, last_step=7)
    saved = []
    manager.save = lambda engine, states, record: saved.append(record.step)
    for step in range(1, 8):
        manager.save_if_due(None, {}, RunRecord(step=step, world_size=1), force=step == 4)
    assert saved == [3, 4, 6, 7]


def test_a_record_comes_back_as_written_and_an_older_one_without_model_and_versions_loads(tmp_path):
    record = RunRecord(step=2, world_size=4, tensor_parallel=2, recipe={"model": {"name": "tiny", "overrides": {}}},
                       model={"embed_dim": 64}, versions=installed_versions())
    assert RunRecord.from_dict(record.to_dict(), "x") == record
    older = RunRecord.from_dict({"step": 2, "world_size": 4, "recipe": record.recipe}, "x")
    assert (older.model, older.versions, older.tensor_parallel, older.model_section()) == (None, {}, 1, ("tiny", {}))
    with pytest.raises(CheckpointError, match="x is not a run record"):
        RunRecord.from_dict({"world_size": 4}, "x")


def test_a_resume_with_another_model_or_tensor_parallel_size_is_refused_naming_both():
    from rwkvclip_dist.typed_config import ConfigError

    record = RunRecord(step=2, world_size=1, recipe={"model": {"name": "tiny", "overrides": {"text.pool": "paper"}}},
                       model={"text": {"pool": "paper", "depth": 2}})
    check_resumable(record, "c/step_2", 1, {"text": {"pool": "paper", "depth": 2}}, "tiny", {"text.pool": "paper"})
    with pytest.raises(ConfigError, match=r"differing: text.depth: checkpoint 2, this run 3\)"):
        check_resumable(record, "c/step_2", 1, {"text": {"pool": "paper", "depth": 3}}, "tiny", {"text.depth": 3})
    with pytest.raises(ConfigError, match="saved with parallel.tensor_parallel=1, this run has 2"):
        check_resumable(record, "c/step_2", 2, record.model, "tiny", {})
    record.model = None  # an older checkpoint: compared through its recipe's model section
    with pytest.raises(ConfigError, match=r"differing: text.pool: checkpoint 'paper', this run \(absent\)\)"):
        check_resumable(record, "c/step_2", 1, {}, "tiny", {})
