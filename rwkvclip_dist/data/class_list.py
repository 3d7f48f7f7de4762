"""The one reader of class-list files (one class name a line, line N from 1 is label N-1), for
``make_shards.py --classes``, ``tools/evaluate.py --classnames`` and the in-loop evaluation's
``classnames`` alike: a blank or repeated line is refused, naming the line, never dropped (dropping a
line shifts every label after it; a repeated name splits its class's score in two)."""
from __future__ import annotations

from rwkvclip_dist.cli import read_text_file


class ClassListError(ValueError):
    """A class-list file that cannot give one name per label; the message names the file and line."""


def read_class_list(path: str, option: str = "class list") -> list[str]:
    """The class names of ``path``, in label order (trailing blank lines allowed); ``option`` names
    where the path was given (``--classes``) in the error."""
    names = [line.strip() for line in read_text_file(path, option, ClassListError).splitlines()]
    while names and not names[-1]:
        names.pop()
    first: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if not name:
            raise ClassListError(f"{option} {path}:{n}: empty class name (every line is a label, in order)")
        if name in first:
            raise ClassListError(f"{option} {path}:{n}: class {name!r} repeats line {first[name]}")
        first[name] = n
    if not names:
        raise ClassListError(f"{option} {path}: no class names")
    return names
