"""How every command-line entry point (``tools/*.py``, ``train.py``) reports a bad input.

A mistake the user can fix (a missing or unreadable file, a wrong value, a recipe error, a missing
optional dependency) ends in one line, ``prog: error: <what and where>``, and exit status 2, as
argparse does for a bad argument; ``--debug`` shows the Python traceback instead. The library
raises these as ``ValueError`` (``ConfigError``, ``FieldError`` and ``StateDictMismatch`` are
ValueErrors), ``OSError`` (``FileNotFoundError`` ...) or ``ImportError``, with messages that name
the file, key or sample; anything else is a bug and keeps its traceback.

    def main(argv=None) -> int:
        return run_tool(build_parser(), run, argv)      # run(args) -> int | None

Options and positionals may come in any order (``--recipe R a.b=1 --run-dir D c.d=2``): every parser is
read with ``parse_intermixed_args`` (argparse cannot do that with sub-commands; those read as usual).
tests/test_layout.py checks that every tool follows this convention.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
DEBUG_FLAG = "--debug"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(DEBUG_FLAG, action="store_true", help="on an error, show the Python traceback")


def error_line(prog: str, err: BaseException) -> str:
    """``prog: error: message``; a multi-line message (a list of mismatched keys) stays indented under it."""
    first, *rest = (str(err).strip() or type(err).__name__).splitlines()
    return "\n".join([f"{prog}: error: {first}", *("  " + line.strip() for line in rest)])


@contextlib.contextmanager
def user_errors(prog: str, debug: bool, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turns a user's mistake raised inside the block into the error line and ``SystemExit(2)``."""
    try:
        yield
    except USER_ERRORS + extra as err:
        if debug:
            raise
        print(error_line(prog, err), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``RWKVCLIP_DEBUG=1`` (e.g. for every rank of a launcher)."""
    return DEBUG_FLAG in argv or os.environ.get("RWKVCLIP_DEBUG") == "1"


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` with options and positionals intermixed, as people type them."""
    if any(isinstance(action, argparse._SubParsersAction) for action in parser._actions):
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)


def run_tool(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, extra: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` (with ``--debug`` added, accepted anywhere, also after a sub-command) and run
    ``body(args)``; returns its exit status, or 2 after printing the error line of a user's mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    add_debug_flag(parser)
    args = parse(parser, [a for a in argv if a != DEBUG_FLAG])
    try:
        return body(args) or 0
    except USER_ERRORS + extra as err:
        if debug_requested(argv):
            raise
        print(error_line(parser.prog, err), file=sys.stderr, flush=True)
        return 2


def read_text_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> str:
    """The text of a file the user named; a missing file, a folder or bytes that are not UTF-8 become
    one line naming ``what`` (``recipe``, ``--classes``), as ``error`` (``FileNotFoundError`` for a
    missing one), instead of a raw ``[Errno 21]`` or a ``UnicodeDecodeError``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{what} {path}: is a directory; give the path of a text file") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
