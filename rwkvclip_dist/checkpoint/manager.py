"""One checkpoint manager for everything with state: model, optimizer (DeepSpeed), data loader, RNGs,
counters and the resolved recipe.

Layout of ``<dir>``::

    step_00000400/            DeepSpeed's files (model and optimizer shards), written by every rank
        client_state.pt       global state: step, samples, data-loader state, recipe (rank 0)
        rank_00001_rng.pt     this rank's RNG states (python, numpy, torch, cuda), one file per rank
    latest                    the tag of the newest *complete* checkpoint

``latest`` is replaced atomically (write a temporary file, then rename) by rank 0, and only after
every rank reported its part written; a save that dies half-way therefore leaves ``latest`` naming
the previous checkpoint, which is still complete. Older checkpoints beyond ``keep_last`` (and any
incomplete leftovers) are deleted after a new one completes.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvclip_dist.parallel import collectives

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
CLIENT_FILE = "client_state.pt"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
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

    # -- save ----------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Save a checkpoint of ``engine`` and ``client_state`` on every rank; returns its tag."""
        tag = tag_for_step(step)
        tag_dir = self.directory / tag
        if self.rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
            # A crashed save of the same step may have left a stale client file; it must not count.
            (tag_dir / CLIENT_FILE).unlink(missing_ok=True)
        collectives.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False)
        _atomic_torch_save(capture_rng_state(), tag_dir / f"rank_{self.rank:05d}_rng.pt")
        collectives.barrier()
        if self.rank == 0:
            # The client file is the completion marker: written only once every rank has written.
            _atomic_torch_save(client_state, tag_dir / CLIENT_FILE)
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
    def load(self, engine, tag: str | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint (or ``tag``) into ``engine``.

        Returns the client state, or None when there is nothing to resume from. This rank's RNG states
        are restored when the checkpoint has a file for this rank (same or larger world size).
        """
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.directory / tag
        load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        client_state = torch.load(tag_dir / CLIENT_FILE, weights_only=False)
        rng_file = tag_dir / f"rank_{self.rank:05d}_rng.pt"
        if rng_file.is_file():
            restore_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint %s has no RNG state for rank %d (world size changed); "
                        "this rank's random streams restart from the seed", tag_dir, self.rank)
        log.info("resumed from %s (step %s)", tag_dir, client_state.get("step"))
        return client_state
