"""Who may write a run directory: one live trainer at a time, and no rank whose launcher is gone.

torchrun starts each worker in a session of its own, so a killed launcher (the OOM killer, a ``kill``
of its process group) leaves its ranks running as orphans; a restarted job would then train beside
them into the same checkpoints. Two guards:

- :class:`RunLock`: rank 0 holds an exclusive ``flock`` on ``<dir>/.trainer.lock`` for the whole
  run, with the holder's host, pid and Slurm job written inside. The kernel drops the lock when the
  holder dies (SIGKILL included), so a dead run never keeps it. Over NFS, Linux maps ``flock`` to
  POSIX locks, which the server arbitrates between nodes; a file system without locks (Lustre
  mounted without ``-o flock``) is reported once and the run goes on unguarded.
- :class:`LauncherWatch`: a rank started by a launcher (torchrun, ``srun``) remembers its parent;
  once the parent is gone the process has been re-parented, and the loop saves and stops.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from rwkvclip_dist.parallel import collectives

log = logging.getLogger(__name__)
LOCK_FILE = ".trainer.lock"
# A lock still held by the forked data-loader workers of a holder that just died: they notice their
# parent is gone within seconds (torch's worker watchdog), so a successor waits this long for them.
DEAD_HOLDER_GRACE_S = 30.0


class RunDirectoryBusy(RuntimeError):
    """Another live trainer holds the run directory."""


def _holder_alive(info: dict[str, str]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot look at another host's processes: trust its lock
    try:
        os.kill(int(info.get("pid", "0")), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


class RunLock:
    """An exclusive lock on a directory for the life of this process (or until :meth:`release`)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                if _holder_alive(info):
                    os.close(fd)
                    raise RunDirectoryBusy(
                        f"{self.path.parent} is in use by another trainer (host {info.get('host', '?')}, "
                        f"pid {info.get('pid', '?')}, job {info.get('job', '-')}, since {info.get('since', '?')}); "
                        f"stop that run or choose another run directory") from None
                deadline = deadline or time.monotonic() + DEAD_HOLDER_GRACE_S
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RunDirectoryBusy(
                        f"{self.path.parent}: its lock is still held {DEAD_HOLDER_GRACE_S:.0f} s after its "
                        f"holder (pid {info.get('pid')}) died; a child of it lives on: "
                        f"`fuser -v {self.path}` names it") from None
                time.sleep(0.5)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                log.warning("%s: this file system does not support locks (%s); nothing stops a second "
                            "trainer from writing the same run directory", self.path, err.strerror)
                os.close(fd)
                return
        holder = (f"host={socket.gethostname()}\npid={os.getpid()}\njob={os.environ.get('SLURM_JOB_ID', '-')}\n"
                  f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode()
        # Through the locked descriptor: with POSIX locks (NFS) closing any other descriptor of the
        # file would release the lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LauncherWatch:
    """Notices that the process which started this rank (torchrun's agent, slurmstepd) is gone."""

    def __init__(self, launcher: str) -> None:
        parent = os.getppid()
        # A plain `python train.py` belongs to a shell; `nohup ... &` outliving it is intended. A
        # parent that is already init (pid 1) cannot be told apart from having been re-parented.
        self.parent = parent if launcher in ("torchrun", "slurm") and parent > 1 else None

    def launcher_gone(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


@contextlib.contextmanager
def run_directories_locked(directories: list[Path], is_main: bool) -> Iterator[None]:
    """Collective: rank 0 holds locks on the run's directories for the ``with`` block, released however
    it ends; every rank raises :class:`RunDirectoryBusy` when another live trainer holds one of them."""
    locks: list[RunLock] = []
    refusal = None
    try:
        if is_main:
            try:
                for directory in dict.fromkeys(d.resolve() for d in directories):
                    locks.append(RunLock(directory))
                    locks[-1].acquire()
            except RunDirectoryBusy as err:
                refusal = str(err)
        refusal = collectives.broadcast_object(refusal)
        if refusal is not None:
            raise RunDirectoryBusy(refusal)
        yield
    finally:
        for lock in locks:
            lock.release()
