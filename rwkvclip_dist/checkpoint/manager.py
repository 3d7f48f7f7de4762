"""One checkpoint manager for everything with state: model and optimizer (through the DeepSpeed
engine) and any number of Stateful objects (``state_dict()`` / ``load_state_dict()``: the run's
``TrainState`` with its RNGs, the data loader), plus a small record of the run (step, world size,
resolved recipe).

Layout of ``<dir>``::

    step_00000400/            DeepSpeed's files (model and optimizer shards), written by every rank
        rank_00001.pt         this rank's Stateful objects, one file per rank
        client_state.pt       the run's record (rank 0), written last: it marks the checkpoint complete
    latest                    the tag of the newest *complete* checkpoint

``latest`` is replaced atomically (write a temporary file, then rename) by rank 0, and only after
every rank reported its part written; a save that dies half-way therefore leaves ``latest`` naming
the previous checkpoint, which is still complete. Older checkpoints beyond ``keep_last`` (and any
incomplete leftovers) are deleted after a new one completes.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.typed_config import FieldError, path_field

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
CLIENT_FILE = "client_state.pt"


@dataclass
class CheckpointSection:
    """The ``checkpoint:`` section of a recipe."""

    dir: str = path_field("")
    """Where checkpoints go; empty means <run dir>/checkpoints."""
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest k complete checkpoints; older ones are deleted after a new one completes."""
    resume: bool = True
    """Resume automatically from the newest complete checkpoint in ``dir``."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise FieldError("every_steps", f"must be >= 0 (0: only at the end), got {self.every_steps}")
        if self.keep_last < 1:
            raise FieldError("keep_last", f"must be >= 1, got {self.keep_last}")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = collectives.rank()

    # -- discovery ---------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """The tag named by ``latest``, or None when there is no complete checkpoint."""
        path = self.directory / "latest"
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not TAG_PATTERN.match(tag) or not (self.directory / tag / CLIENT_FILE).is_file():
            raise RuntimeError(f"{path} names {tag!r}, which is not a complete checkpoint in {self.directory}")
        return tag

    def complete_tags(self) -> list[str]:
        latest = self.latest_tag()
        if latest is None:
            return []
        newest = int(TAG_PATTERN.match(latest).group(1))
        tags = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
                and int(TAG_PATTERN.match(p.name).group(1)) <= newest and (p / CLIENT_FILE).is_file()]
        return sorted(tags)

    def read_record(self, tag: str) -> dict[str, Any]:
        """The run's record saved with checkpoint ``tag`` (step, world size, tensor_parallel, recipe)."""
        return _load_plain(self.directory / tag / CLIENT_FILE)

    # -- save ----------------------------------------------------------------------------------
    def save(self, engine, step: int, states: Mapping[str, Stateful], record: dict[str, Any]) -> str:
        """Collective: save ``engine`` and every rank's ``states``, then rank 0's ``record``; returns the tag."""
        tag = tag_for_step(step)
        tag_dir = self.directory / tag
        if self.rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
            # A crashed save of the same step may have left a stale client file; it must not count.
            (tag_dir / CLIENT_FILE).unlink(missing_ok=True)
        collectives.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False)
        _atomic_torch_save({name: obj.state_dict() for name, obj in states.items()}, tag_dir / rank_file(self.rank))
        collectives.barrier()
        if self.rank == 0:
            # The client file is the completion marker: written only once every rank has written.
            _atomic_torch_save(record, tag_dir / CLIENT_FILE)
            _atomic_write_text(self.directory / "latest", tag + "\n")
            self._prune(tag)
        collectives.barrier()
        log.info("saved checkpoint %s", tag_dir)
        return tag

    def _prune(self, newest: str) -> None:
        keep = set(self.complete_tags()[-self.keep_last:]) | {newest}
        for path in self.directory.iterdir():
            if path.is_dir() and TAG_PATTERN.match(path.name) and path.name not in keep:
                shutil.rmtree(path)

    # -- load ----------------------------------------------------------------------------------
    def load(self, engine, states: Mapping[str, Stateful], tag: str | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint (or ``tag``) into ``engine`` and ``states``.

        Returns the run's record, or None when there is nothing to resume from. Each rank reads its own
        file; a rank the saved run did not have (larger world size) reads rank 0's, and its
        Stateful objects decide what of another rank's state applies to it.
        """
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.directory / tag
        load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        record = _load_plain(tag_dir / CLIENT_FILE)
        own = tag_dir / rank_file(self.rank)
        saved = _load_plain(own if own.is_file() else tag_dir / rank_file(0))
        missing = sorted(set(states) - set(saved))
        if missing:
            raise RuntimeError(f"checkpoint {tag_dir} holds no state for {missing} (it has {sorted(saved)})")
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
        log.info("resumed from %s (step %s)", tag_dir, record.get("step"))
        return record


def _load_plain(path: Path) -> dict[str, Any]:
    # Only tensors and plain containers: a checkpoint file can never run code when read.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RuntimeError(f"checkpoint file {path} is missing") from None
