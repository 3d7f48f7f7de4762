"""Telling a lost peer apart from other errors, so a surviving rank can say so in one line and exit.

When a rank dies (SIGKILL, a lost node, the OOM killer), the others find out in their next
collective: at once when the dead process's sockets are closed by its kernel ("Connection closed by
peer"), or after ``parallel.timeout_s`` when nothing answers at all (a frozen process, a node whose
network is gone). gloo raises a plain ``RuntimeError`` whose text comes from its transport; NCCL and
the c10d store raise ``torch.distributed.DistError`` subclasses. Either way nothing can be saved any
more (every save is collective), and the survivor should exit non-zero at once so that its launcher
(torchrun ``--max-restarts``, a Slurm requeue) restarts the job from the last complete checkpoint.
"""
from __future__ import annotations

import torch.distributed as dist

EXIT_PEER_LOST = 3
"""Exit status of a rank that gave up on a lost peer."""

# Phrases of gloo's transport errors (third_party/gloo/gloo/transport/tcp) and of torch's c10d store.
_PEER_LOST_PHRASES = (
    "gloo/transport", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
    "Timed out waiting", "Socket Timeout", "Connection refused", "NCCL communicator was aborted",
)


def is_peer_loss(error: BaseException) -> bool:
    """True when ``error`` (or an error it was raised from) says another rank stopped answering."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, dist.DistError):
            return True
        if isinstance(current, RuntimeError) and any(p in str(current) for p in _PEER_LOST_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def peer_loss_message(error: BaseException, rank: int, timeout_s: float, waited_s: float | None) -> str:
    """One line for the log: which rank gave up, after how long, and gloo/NCCL's own reason."""
    reason = " ".join(str(error).split())
    if len(reason) > 300:
        reason = reason[:300] + "..."
    waited = f" after {waited_s:.0f} s" if waited_s is not None else ""
    return (f"rank {rank}: lost contact with a peer rank{waited} (collective timeout {timeout_s:g} s): "
            f"{reason}; exiting so the job can restart from its last complete checkpoint")
