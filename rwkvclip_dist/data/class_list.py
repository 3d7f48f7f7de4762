"""The one reader of class-list files (one class name a line, line N from 1 is label N-1), for
``make_shards.py --classes``, ``tools/evaluate.py --classnames`` and the in-loop evaluation's
``classnames`` alike: a blank or repeated line is refused, naming the line, never dropped (dropping a
line shifts every label after it; a repeated name splits its class's score in two).

A published benchmark's own list (a suite task's ``classnames.txt``) is read with ``published=True``:
its repeats are part of the benchmark's definition (CLIP's ImageNet names have "missile" and
"sunglasses" twice each, and every published ImageNet number was scored with them), so they are kept
and named in one warning instead; blank lines are refused all the same."""
from __future__ import annotations

import logging

from rwkvclip_dist.cli import read_text_file

log = logging.getLogger(__name__)


class ClassListError(ValueError):
    """A class-list file that cannot give one name per label; the message names the file and line."""


def read_class_list(path: str, option: str = "class list", published: bool = False) -> list[str]:
    """The class names of ``path``, in label order (trailing blank lines allowed); ``option`` names
    where the path was given (``--classes``) in the error; ``published``: a benchmark's own list,
    whose repeats are kept with a warning (module docstring)."""
    names = [line.strip() for line in read_text_file(path, option, ClassListError).splitlines()]
    while names and not names[-1]:
        names.pop()
    first: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if not name:
            raise ClassListError(f"{option} {path}:{n}: empty class name (every line is a label, in order)")
        if name in first and not published:
            raise ClassListError(f"{option} {path}:{n}: class {name!r} repeats line {first[name]}")
        if name in first:
            log.warning("%s %s:%d: class %r repeats line %d; kept, as the benchmark publishes it",
                        option, path, n, name, first[name])
        first.setdefault(name, n)
    if not names:
        raise ClassListError(f"{option} {path}: no class names")
    return names
