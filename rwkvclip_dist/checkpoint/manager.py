"""One checkpoint manager for everything with state: model and optimizer (through the DeepSpeed
engine) and any number of Stateful objects (``state_dict()`` / ``load_state_dict()``: the run's
``TrainState`` with its RNGs, the data loader), plus the run's ``RunRecord`` (``record.py``). This
package alone reads and writes that record and ``latest``.

Layout of ``<dir>``::

    step_00000400/            DeepSpeed's files (model and optimizer shards), written by every rank
        rank_00001.pt         this rank's Stateful objects, one file per rank
        manifest.json         every file above with its size (rank 0, once all ranks have written)
        client_state.pt       the run's RunRecord (rank 0), written last: it marks the checkpoint complete
    latest                    the tag of the newest *complete* checkpoint

``latest`` is replaced atomically (write a temporary file, then rename) by rank 0, and only after
every rank reported its part written; a save that dies half-way therefore leaves ``latest`` naming
the previous checkpoint, which is still complete. Older checkpoints beyond ``keep_last`` (and any
incomplete leftovers) are deleted after a new one completes. On resume the files are checked against
the manifest and read as data only (``integrity``, ``safe_load``); before a save, the free space.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from rwkvclip_dist.checkpoint import reshard
from rwkvclip_dist.checkpoint.integrity import (TAG_PATTERN, CheckpointError, CheckpointSpaceError, check_space,
                                                human_bytes, list_files, manifest_bytes, newest_intact,
                                                write_manifest)
from rwkvclip_dist.checkpoint.record import RunRecord, check_resumable
from rwkvclip_dist.checkpoint.remote import RemoteCheckpoints, open_remote
from rwkvclip_dist.checkpoint.safe_load import load_weights_only, make_engine_loads_safe
from rwkvclip_dist.parallel import collectives

log = logging.getLogger(__name__)
CLIENT_FILE = "client_state.pt"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def read_latest(directory: Path) -> str | None:
    """The tag the ``latest`` file of a checkpoint directory names, unchecked (None without one)."""
    path = Path(directory) / "latest"
    return path.read_text().strip() if path.is_file() else None


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
    """Saves (when due: every ``every_steps``, 0 for none on the way, and at ``last_step``), finds and
    loads a run's checkpoints in ``directory``. The loop asks :meth:`save_if_due` after each step."""

    def __init__(self, directory: str | Path, keep_last: int = 3, every_steps: int = 0,
                 last_step: int | None = None, remote: str = "") -> None:
        self.directory = Path(directory)
        self.keep_last, self.every_steps, self.last_step = keep_last, every_steps, last_step
        self.rank = collectives.rank()
        self.remote = open_remote(remote, keep_last, CLIENT_FILE) if remote and self.rank == 0 else None

    def close(self) -> None:
        """Wait for the background upload of the last checkpoint (rank 0 with ``checkpoint.remote``)."""
        if self.remote is not None:
            self.remote.close()

    # -- discovery ---------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """The tag named by ``latest``, or None when there is no complete checkpoint."""
        tag = read_latest(self.directory)
        if tag is None:
            return None
        if not TAG_PATTERN.match(tag) or not (self.directory / tag / CLIENT_FILE).is_file():
            raise CheckpointError(f"{self.directory / 'latest'} names {tag!r}, which is not a complete checkpoint in {self.directory}; "
                                  f"write the tag of a complete one into it (a step_* folder with {CLIENT_FILE})")
        return tag

    def complete_tags(self) -> list[str]:
        latest = self.latest_tag()
        if latest is None:
            return []
        newest = int(TAG_PATTERN.match(latest).group(1))
        tags = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
                and int(TAG_PATTERN.match(p.name).group(1)) <= newest and (p / CLIENT_FILE).is_file()]
        return sorted(tags)

    def read_record(self, tag: str) -> RunRecord:
        """The run's record saved with checkpoint ``tag``."""
        path = self.directory / tag / CLIENT_FILE
        return RunRecord.from_dict(_load_plain(path), str(path))

    def check_resumable(self, tensor_parallel: int, model: dict[str, Any], model_name: str,
                        model_overrides: dict[str, Any], remote: str = "") -> None:
        """Before any engine is built: refuse (``ConfigError``, one line naming both) to resume the newest
        checkpoint with another tensor-parallel size or model; without a local one, the newest complete
        copy at ``remote`` (what the resume would download; only its record is read); else nothing."""
        tag = self.latest_tag()
        if tag is not None:
            where, record = str(self.directory / tag), self.read_record(tag)
        elif remote and (found := RemoteCheckpoints(remote, CLIENT_FILE).newest_marker()) is not None:
            where, marker = found[0], f"{found[0]}/{CLIENT_FILE}"
            record = RunRecord.from_dict(load_weights_only(io.BytesIO(found[1]), name=marker), marker)
        else:
            return
        check_resumable(record, where, tensor_parallel, model, model_name, model_overrides)

    def refuse_to_overwrite(self) -> None:
        """For a run that starts over (``checkpoint.resume: false``): stop if checkpoints are there."""
        tags = self.complete_tags()
        if tags:
            raise CheckpointError(f"checkpoint.resume is false but {self.directory} holds checkpoints of an "
                                  f"earlier run (up to {tags[-1]}) that this run would overwrite; choose another "
                                  f"run directory (or checkpoint.dir), or delete them")

    # -- save ----------------------------------------------------------------------------------
    def save_if_due(self, engine, states: Mapping[str, Stateful], record: RunRecord, force: bool = False) -> bool:
        """Collective: :meth:`save` at the interval, the last step or ``force`` (a stop); True if it saved."""
        step = record.step
        if force or step == self.last_step or (self.every_steps and step % self.every_steps == 0):
            self.save(engine, states, record)
            return True
        return False

    def save(self, engine, states: Mapping[str, Stateful], record: RunRecord) -> str:
        """Collective: save ``engine`` and every rank's ``states`` as step ``record.step``, then rank 0's
        manifest and ``record``.

        Order: every rank's files; a barrier; the manifest; the completion marker; ``latest``. A save
        killed anywhere before the marker leaves an unmarked directory that is never loaded and is
        cleared by the next save of that step; killed after it, ``latest`` still names the previous one.
        """
        tag = tag_for_step(record.step)
        tag_dir = self.directory / tag
        problem = None
        if self.rank == 0:
            problem = self._prepare(tag_dir, engine)
        # Every failure of rank 0's preparation reaches every rank: the others are waiting here.
        problem = collectives.broadcast_object(problem)
        if problem is not None:
            raise problem
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False)
            _atomic_torch_save({name: obj.state_dict() for name, obj in states.items()},
                               tag_dir / rank_file(self.rank))
        except (OSError, RuntimeError) as err:
            if not self._out_of_space(err, engine):
                raise
            # The other ranks learn of it as a lost peer: DeepSpeed's own barriers are on the way.
            self._remove_partial(tag_dir)
            raise CheckpointSpaceError(
                f"no space left in {self.directory} while writing checkpoint {tag} "
                f"({getattr(err, 'filename', None) or type(err).__name__}): it needs about "
                f"{human_bytes(self._needed_bytes(engine))}, {human_bytes(shutil.disk_usage(self.directory).free)} "
                f"is free; the previous checkpoint {read_latest(self.directory)} is intact") from None
        collectives.barrier()
        if self.rank == 0:
            write_manifest(tag_dir, list_files(tag_dir, CLIENT_FILE), _atomic_write_text)
            # The client file is the completion marker: written only once every rank has written.
            _atomic_torch_save(record.to_dict(), tag_dir / CLIENT_FILE)
            _atomic_write_text(self.directory / "latest", tag + "\n")
            self._prune(tag)
            if self.remote is not None:
                self.remote.submit(tag_dir)
        collectives.barrier()
        log.info("saved checkpoint %s", tag_dir)
        return tag

    def _prepare(self, tag_dir: Path, engine) -> CheckpointError | None:
        """Rank 0, before a save: clear what a crashed save of this step left; check the space.

        Returns what went wrong instead of raising: the other ranks wait in the broadcast after it.
        """
        try:
            if tag_dir.is_dir():
                if tag_dir.name == read_latest(self.directory):
                    return CheckpointError(f"refusing to overwrite {tag_dir}, the newest complete checkpoint")
                shutil.rmtree(tag_dir)
            tag_dir.mkdir(parents=True)
        except OSError as err:
            return CheckpointError(f"cannot prepare checkpoint directory {tag_dir}: {err.strerror or err} "
                                   f"({err.filename or tag_dir}); the previous checkpoint "
                                   f"{read_latest(self.directory)} is intact")
        try:
            check_space(self.directory, self._needed_bytes(engine))
        except CheckpointSpaceError as err:
            tag_dir.rmdir()
            return err
        return None

    def _needed_bytes(self, engine) -> int:
        previous = read_latest(self.directory)
        size = manifest_bytes(self.directory / previous) if previous else None
        if size is None:
            # No previous checkpoint to go by: weights, plus fp32 master weights and two Adam moments.
            params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
            size = params * (12 + next(engine.module.parameters()).element_size())
        return size

    def _out_of_space(self, err: Exception, engine) -> bool:
        if isinstance(err, OSError):
            return err.errno in (errno.ENOSPC, errno.EDQUOT)
        # torch.save's zip writer reports a full disk as "[enforce fail at inline_container.cc] ...".
        return "inline_container" in str(err) and shutil.disk_usage(self.directory).free < self._needed_bytes(engine)

    def _remove_partial(self, tag_dir: Path) -> None:
        if self.rank == 0 and not (tag_dir / CLIENT_FILE).exists():
            shutil.rmtree(tag_dir, ignore_errors=True)

    def _prune(self, newest: str) -> None:
        keep = set(self.complete_tags()[-self.keep_last:]) | {newest}
        keep |= self.remote.in_flight() if self.remote is not None else set()
        for path in self.directory.iterdir():
            if path.is_dir() and TAG_PATTERN.match(path.name) and path.name not in keep:
                shutil.rmtree(path)

    # -- load ----------------------------------------------------------------------------------
    def choose_tag(self) -> str | None:
        """Collective: the newest complete checkpoint whose files match its manifest (rank 0 decides).

        A complete checkpoint with missing or truncated files is skipped with a warning that names
        them, and renamed ``<tag>.broken`` so that it is neither loaded nor pruned; if no complete
        checkpoint survives the check, the run stops rather than start over.
        """
        decision: tuple[str | None, str | None] = (None, None)
        if self.rank == 0:
            decision = newest_intact(self.directory, self.complete_tags(), _atomic_write_text)
            if decision == (None, None) and self.remote is not None:
                decision = (self.remote.try_restore(self.directory, _atomic_write_text)
                            or newest_intact(self.directory, self.complete_tags(), _atomic_write_text))
        tag, error = collectives.broadcast_object(decision)
        if error is not None:
            raise CheckpointError(error)
        return tag

    def load(self, engine, states: Mapping[str, Stateful], tag: str | None = None,
             topology: reshard.Topology | None = None) -> RunRecord | None:
        """Load the newest intact complete checkpoint (or ``tag``) into ``engine`` and ``states``.

        Returns the run's record, or None when there is nothing to resume from. Each rank reads its own
        file; a rank the saved run did not have (larger world size) reads rank 0's, and its
        Stateful objects decide what of another rank's state applies to it. Every file, DeepSpeed's
        included, is read as data only (``checkpoint.safe_load``). ``topology``: this run's; when the
        record's data-parallel size differs, the engine loads through ``checkpoint.reshard``.
        """
        tag = tag or self.choose_tag()
        if tag is None:
            return None
        tag_dir = self.directory / tag
        record = self.read_record(tag)
        make_engine_loads_safe(engine)
        load_path = reshard.load(engine, tag_dir, record, topology)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        own = tag_dir / rank_file(self.rank)
        saved = _load_plain(own if own.is_file() else tag_dir / rank_file(0))
        missing = sorted(set(states) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint {tag_dir} holds no state for {missing} (it has {sorted(saved)})")
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
        log.info("resumed from %s (step %s)", tag_dir, record.step)
        return record


def _load_plain(path: Path) -> dict[str, Any]:
    # Only tensors and plain containers: a checkpoint file can never run code when read.
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    return load_weights_only(path)
