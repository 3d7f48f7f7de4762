"""Pre-emption (``training/preemption.py``): SIGTERM and SIGUSR1 are recorded, not acted on, until
the loop asks; the previous handlers come back when the run ends."""
from __future__ import annotations

import os
import signal

import pytest

from rwkvclip_dist.training.preemption import PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_recorded_and_asked_for(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop()
        assert handler.should_stop(also=True)  # another reason of this rank's (a launcher gone)
        os.kill(os.getpid(), sig)  # the process goes on: the handler only records it
        assert handler.received == sig and handler.should_stop()
    finally:
        handler.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
