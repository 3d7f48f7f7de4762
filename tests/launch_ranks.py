"""``python tests/launch_ranks.py NPROC PORT SCRIPT ARGS...``: NPROC local ranks of SCRIPT, each given
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as the ``deepspeed``
launcher (the trainer's documented entry point) gives them.

The tests' launcher wherever the test is about the run, not the launcher: torchrun imports torch and
its elastic agent first, ~1.9 s of CPU and of wall time per launch (conftest.launch_cmd). The tests of
torchrun's own behaviour (restarts, orphans, its exit status) keep torchrun (conftest.torchrun_cmd).
Like torchrun: SIGTERM and SIGINT are passed to the ranks; when a rank fails the others are
terminated (killed 30 s later) and the launcher exits with the first failure's status; the ranks die
with the launcher (a test's timeout kills it).

The ranks are forked from the launcher once it has imported :data:`PRELOAD` (torch, the torch._dynamo
that torch's optimizers import at their first parameter group, DeepSpeed: ~2.7 s of CPU that every rank
paid again), then run SCRIPT as ``python -u SCRIPT ARGS`` would: ``__main__``, its folder first on
``sys.path``, Python's own signal handlers, fresh ``random`` and NumPy seeds, and the interpreter's
normal exit (threads joined, ``atexit``). The launcher's environment is the ranks' but for the six
variables above, which those imports do not read, so what the imports set up is what each rank would
have set up itself. Nothing of the project is imported before the fork: its import-time code runs in
each rank. ``RWKVCLIP_LAUNCH_EXEC=1`` starts each rank with its own interpreter instead.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import os
import runpy
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PRELOAD = ("torch", "torch._dynamo", "deepspeed")


def _die_with_the_launcher() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Forked:
    """A forked rank with the part of ``subprocess.Popen``'s interface the launcher uses."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)


def _run_rank(command: list[str]) -> None:
    """In the forked child: become ``python -u command...``; returns only by raising SystemExit."""
    _die_with_the_launcher()
    script = os.path.abspath(command[0])
    sys.argv = [command[0], *command[1:]]
    sys.path[0] = os.path.dirname(script)
    if "numpy" in sys.modules:  # (``random`` reseeds itself in a forked child; NumPy does not)
        sys.modules["numpy"].random.seed()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True)
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def main(nproc: int, port: str, command: list[str]) -> int:
    fork = os.environ.get("RWKVCLIP_LAUNCH_EXEC") != "1"
    if fork:
        for module in PRELOAD:
            importlib.import_module(module)
        gc.freeze()  # the imports' objects stay out of the ranks' collections (and their pages shared)
    ranks = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if not fork:
            ranks.append(subprocess.Popen([sys.executable, "-u", *command], env=env,
                                          preexec_fn=_die_with_the_launcher))
            continue
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.environ.clear()
            os.environ.update(env)
            _run_rank(command)  # SystemExit unwinds this frame: the rank ends as an interpreter does
        ranks.append(_Forked(pid))

    def forward(signum, _frame):
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failure, kill_at = None, None
    while [proc.poll() for proc in ranks].count(None):  # every rank polled (any() would stop at the first)
        if failure is None and (failed := [p.returncode for p in ranks if p.returncode not in (None, 0)]):
            failure, kill_at = failed[0], time.monotonic() + 30
            forward(signal.SIGTERM, None)
        if kill_at is not None and time.monotonic() > kill_at:
            forward(signal.SIGKILL, None)
        time.sleep(0.02)
    if failure is None:
        failure = next((p.returncode for p in ranks if p.returncode != 0), 0)
    return failure if failure >= 0 else 128 - failure  # a rank killed by a signal: the shell's status


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
