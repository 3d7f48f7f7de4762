"""How every tool and the trainer write their outputs without losing a user's data.

- :func:`check_apart`: an output is never one of the inputs, nor a folder holding one (nor, for an
  input folder read as a whole, a path inside it): ``convert_checkpoint.py to-authors m.safetensors
  m.safetensors`` would replace the model with what it is reading.
- :func:`refuse_existing`: an existing output of an earlier job is replaced only when the user asks
  (``--overwrite``).
- :class:`Staged`: an output is written under a temporary name beside its final path and renamed into
  place only on success (a tool that fails, or whose ``--verify`` fails, leaves nothing behind; a
  reader never sees half a file).
- :func:`strict_json` / :func:`write_json`: every JSON file the project writes is strict JSON
  (``NaN``/``Infinity`` are not JSON; a non-finite number is written as ``null``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class OutputError(ValueError):
    """An output path that would lose data (an input, another job's output); names the option."""


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def check_apart(output: str | Path, output_option: str, inputs: dict[str, str | Path | None],
                inputs_read_whole: bool = False) -> None:
    """Refuse ``output`` when it is one of ``inputs`` (``{option: path}``) or a folder holding one;
    with ``inputs_read_whole`` (an input folder whose whole tree is read), also a path inside one."""
    out = Path(output).expanduser().resolve()
    for option, given in inputs.items():
        if given is None:
            continue
        src = Path(given).expanduser().resolve()
        if out == src:
            raise OutputError(f"{output_option} {output}: is the input {option} {given}; writing it would "
                              f"destroy what is being read (choose another output path)")
        if _inside(src, out):
            raise OutputError(f"{output_option} {output}: holds the input {option} {given}; choose an output "
                              f"path apart from the inputs")
        if inputs_read_whole and _inside(out, src):
            raise OutputError(f"{output_option} {output}: is inside the input {option} {given}, which is read "
                              f"as a whole; choose an output path apart from the inputs")


def check_file_path(path: str | Path, option: str) -> None:
    """An output file's path is not a folder, and its folder is not a file (instead of a raw ``[Errno 21]``
    or ``[Errno 20]`` once the work is done)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory; give the path of a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {path}: {parent} is a file, not a directory")
            break


def check_folder_path(path: str | Path, option: str) -> None:
    """An output folder's path is not an existing file (instead of a raw ``[Errno 17]``)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise OutputError(f"{option} {path}: is a file; give the path of a directory")


def refuse_existing(path: str | Path, option: str, overwrite: bool, what: str = "an earlier run's output") -> None:
    """An existing ``path`` is replaced only with ``--overwrite``."""
    if not overwrite and os.path.lexists(path):
        raise OutputError(f"{option} {path}: exists ({what}); pass --overwrite to replace it, or choose "
                          f"another path")


class Staged:
    """A file (and its sidecars, same stem, other suffixes) written under a temporary name and renamed
    into place by :meth:`commit`; leaving the ``with`` block uncommitted removes the temporary files.

        with Staged(dst, sidecars=(".json",)) as staged:
            save(staged.path)            # staged.path keeps dst's suffix: writers that check it pass
            if verified(staged.path):
                staged.commit()
    """

    def __init__(self, final: str | Path, sidecars: tuple[str, ...] = ()) -> None:
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.stem}.partial-{os.getpid()}{self.final.suffix}")
        self.sidecars = sidecars
        self.committed = False

    def _pairs(self) -> list[tuple[Path, Path]]:
        # Sidecars first: once the main file is in place, what describes it already is.
        return [(self.path.with_suffix(s), self.final.with_suffix(s)) for s in self.sidecars] + [(self.path, self.final)]

    def __enter__(self) -> "Staged":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self) -> None:
        for tmp, final in self._pairs():
            if tmp.exists():
                os.replace(tmp, final)
        self.committed = True

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            for tmp, _ in self._pairs():
                tmp.unlink(missing_ok=True)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: a non-finite float becomes ``null``."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON to ``path``, through a temporary name (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(strict_json(obj, indent=indent) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
