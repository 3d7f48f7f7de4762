"""Crash-safe JSONL output with resume.

Every row is one ``os.write`` of a whole line on an O_APPEND descriptor, followed by ``fsync``: a
SIGKILL can at worst leave a partial last line, never an interleaved or lost earlier one. On start,
:func:`recover` reads the keys already written and cuts such a partial tail, so a restarted run
appends cleanly and writes each key exactly once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def recover(path: str | Path) -> set[str]:
    """Keys already in ``path`` (empty if absent), after repairing a torn last line."""
    path = Path(path)
    if not path.exists():
        return set()
    done: set[str] = set()
    intact = 0  # bytes of complete lines; a torn tail starts here
    tail = b""
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                tail = line
                break
            _add_key(done, line, f"{path}:{line_no}")
            intact += len(line)
    if tail:
        try:
            row = json.loads(tail)
            complete = isinstance(row, dict) and "key" in row
        except ValueError:
            complete = False
        if complete:
            # The row made it but its newline did not: finish the line instead of dropping the row.
            _add_key(done, tail, f"{path}:{line_no}")
            with path.open("ab") as handle:
                handle.write(b"\n")
        else:
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(tail))
            os.truncate(path, intact)
    return done


def first_row(path: str | Path) -> dict | None:
    """The first complete row of ``path`` (None if it has none): what job wrote the file."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        line = handle.readline()
    try:
        row = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _add_key(done: set[str], line: bytes, where: str) -> None:
    if not line.strip():
        return
    try:
        key = json.loads(line)["key"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a description row ({err}); fix or move the file") from err
    if key in done:
        raise ValueError(f"{where}: key {key!r} appears twice; the file was not written by this tool")
    done.add(key)


class JsonlAppender:
    """Appends JSON rows, each in one write; fsync at most ``fsync_interval_s`` apart (0: every row).

    With ``exclusive`` the file is locked so a second run pointed at the same output (two workers
    given the same --shard, say) fails at once instead of writing keys twice.
    """

    def __init__(self, path: str | Path, fsync_interval_s: float = 1.0, exclusive: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        if exclusive:
            self._lock()

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self._fd)
            raise BlockingIOError(f"{self.path} is being written by another run; give each worker its own --out") from err
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # Some cluster file systems are mounted without flock support.
            log.warning("%s: cannot lock (%s); make sure no other run writes this file", self.path, err.strerror)

    def write(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes); is the disk full?")
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_interval_s:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
