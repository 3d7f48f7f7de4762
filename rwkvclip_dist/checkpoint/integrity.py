"""What makes a checkpoint trustworthy on disk: a manifest of its files, and room to write it.

``manifest.json`` lists every file of a checkpoint with its size in bytes. Rank 0 writes it after
every rank has written its files and before the completion marker, so a checkpoint that is marked
complete also says exactly what it must contain; a file that was truncated or deleted later (a
partial copy, a disk fault, a clean-up script) is found before anything is loaded.

Sizes, not checksums: hashing would read back every shard after each save (terabytes at scale);
a torch file's zip records carry their own CRC-32.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

MANIFEST_FILE = "manifest.json"
log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
"""A checkpoint's directory name: ``step_`` and the optimizer step, zero-padded."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read safely; the message says which and why."""


class CheckpointSpaceError(CheckpointError):
    """The checkpoint file system has no room for the next checkpoint."""


def _size(path: Path) -> int:
    # Through an open descriptor: on NFS, opening revalidates the attributes another node changed.
    with open(path, "rb") as handle:
        return os.fstat(handle.fileno()).st_size


def list_files(tag_dir: Path, marker: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``tag_dir`` except the manifest and the marker."""
    files = {}
    for path in sorted(tag_dir.rglob("*")):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel not in (MANIFEST_FILE, marker) and not rel.endswith(".tmp"):
            files[rel] = _size(path)
    return files


def write_manifest(tag_dir: Path, files: dict[str, int], write_text) -> None:
    write_text(tag_dir / MANIFEST_FILE, json.dumps({"files": files, "bytes": sum(files.values())}, indent=1, allow_nan=False))


def manifest_bytes(tag_dir: Path) -> int | None:
    """Total size of a checkpoint from its manifest (None without one)."""
    try:
        return int(json.loads((tag_dir / MANIFEST_FILE).read_text())["bytes"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def verify(tag_dir: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files (empty: all there, all of the recorded size).

    A checkpoint written before manifests existed has none; it is reported as unverified, not broken.
    """
    path = tag_dir / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
            raise TypeError("'files' must map names to sizes")
    except (ValueError, KeyError, TypeError) as err:
        return [f"{path} is unreadable ({err})"]
    problems = []
    for rel, size in files.items():
        file = tag_dir / rel
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif (actual := _size(file)) != size:
            problems.append(f"{file} has {actual} bytes, the manifest says {size}")
    return problems


def newest_intact(directory: Path, tags: list[str], write_text) -> tuple[str | None, str | None]:
    """``(tag, None)``: the newest of the complete checkpoints ``tags`` whose files match its manifest;
    ``(None, error)`` when none does; ``(None, None)`` without any. A damaged one is named in a
    warning and renamed ``<tag>.broken`` (never loaded nor pruned); ``latest`` then moves back."""
    broken = []
    for tag in reversed(tags):
        problems = verify(directory / tag)
        if not problems:
            if broken:
                write_text(directory / "latest", tag + "\n")
            return tag, None
        log.warning("checkpoint %s is damaged, skipping it: %s", directory / tag, "; ".join(problems))
        broken.append(f"{tag}: {'; '.join(problems)}")
        (directory / tag).rename(directory / f"{tag}.broken")
    if broken:
        return None, (f"no intact checkpoint in {directory} to resume from (set aside as *.broken: "
                      f"{' | '.join(broken)}); restore the files or start over with checkpoint.resume=false "
                      f"in another directory")
    return None, None


def check_space(directory: Path, needed: int, margin: float = 1.1) -> None:
    """Raise :class:`CheckpointSpaceError` when ``directory`` has less than ``needed`` x ``margin`` free."""
    free = shutil.disk_usage(directory).free
    if free < needed * margin:
        raise CheckpointSpaceError(
            f"not enough space in {directory} for the next checkpoint: it needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} is free; free space or set checkpoint.keep_last "
            f"lower. Nothing was written; the previous checkpoint is intact")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
