"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's pre-emption and time-limit warnings).

The handler only records the request; the train loop asks ``should_stop()`` after each step, and all
ranks agree through an all-reduce (a signal may reach the ranks at slightly different steps), then
save a checkpoint and exit 0 so that a requeued job resumes from it.
"""
from __future__ import annotations

import signal

from rwkvclip_dist.parallel.collectives import all_reduce_max_flag

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, also: bool = False) -> bool:
        """Collective: True on every rank as soon as any rank has received a stop signal (or ``also``:
        another reason of this rank's to stop, such as a launcher that is gone)."""
        return all_reduce_max_flag(self.received is not None or also)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
