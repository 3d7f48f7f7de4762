"""Remove shared-memory segments that crashed or killed runs left in /dev/shm.

MosaicML Streaming keeps its per-node coordination state in ``/dev/shm/<6-digit prefix>_<name>``
and unlinks it only on a clean exit; a SIGKILLed rank leaves it behind, and the next run on the node
then waits on stale barriers or picks an ever-growing prefix. Streaming's own
``clean_stale_shared_memory`` unlinks *every* prefix, including those of runs still going on the same
machine; this removes only segments of this user that no live process has mapped or open.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
STREAMING_NAME = re.compile(r"^\d{6}_\w+$")


def _segments_in_use() -> set[str]:
    """Names of /dev/shm entries that some process has mapped or holds open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            with open(proc / "maps") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        used.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):].split()[0])
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue  # the process ended while we looked, or is not ours to inspect
    return used


def clean_stale_shm(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink this user's unused Streaming segments; returns the names removed."""
    if not shm_dir.is_dir():
        return []
    uid = os.getuid()
    candidates = []
    for entry in shm_dir.iterdir():
        if not STREAMING_NAME.match(entry.name):
            continue
        try:
            if entry.stat().st_uid == uid:
                candidates.append(entry)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    used = _segments_in_use()
    removed = []
    for entry in candidates:
        if entry.name not in used:
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed
