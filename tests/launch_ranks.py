"""``python tests/launch_ranks.py NPROC PORT SCRIPT ARGS...``: NPROC local ranks of SCRIPT, each given
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as the ``deepspeed``
launcher (the trainer's documented entry point) gives them.

The tests' launcher wherever the test is about the run, not the launcher: torchrun imports torch and
its elastic agent first, ~1.9 s of CPU and of wall time per launch (conftest.launch_cmd). The tests of
torchrun's own behaviour (restarts, orphans, its exit status) keep torchrun (conftest.torchrun_cmd).
Like torchrun: SIGTERM and SIGINT are passed to the ranks; when a rank fails the others are
terminated (killed 30 s later) and the launcher exits with the first failure's status; the ranks die
with the launcher (a test's timeout kills it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_the_launcher() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(nproc: int, port: str, command: list[str]) -> int:
    ranks = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks.append(subprocess.Popen([sys.executable, "-u", *command], env=env, preexec_fn=_die_with_the_launcher))

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
