"""The few collectives the evaluation code needs, each a no-op in a single process.

Models never talk to other ranks; evaluation does, but only through these helpers so that every
routine in ``rwkvclip_dist.eval`` runs unchanged on one CPU, one GPU or many ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.parallel.collectives import is_distributed

__all__ = ["is_distributed", "rank", "world_size", "all_reduce_sum", "shard_range", "padded_shard", "all_gather_rows",
           "sharded_over"]

# The group the work is sharded over; None is the world. Set only inside ``sharded_over``.
_GROUP = None


@contextlib.contextmanager
def sharded_over(group):
    """Shard evaluation work over ``group`` instead of the world, within the block. Under tensor
    parallelism that is the data-parallel group: the ranks of a TP group then take the same shard and
    run every forward together, and each shard is summed once."""
    global _GROUP
    previous, _GROUP = _GROUP, group
    try:
        yield
    finally:
        _GROUP = previous


def rank() -> int:
    """This rank's index among the ranks that share the evaluation work."""
    return collectives.rank(_GROUP)


def world_size() -> int:
    """How many shards the evaluation work is split into."""
    return collectives.world_size(_GROUP)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the sharding ranks in place and returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_GROUP)
    return tensor


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous slice ``[start, stop)`` of ``n`` items.

    Contiguous, unpadded shards keep every item exactly once across ranks (a DistributedSampler pads
    with repeats, which would bias accuracies on small evaluation sets).
    """
    per_rank = -(-n // world_size())
    start = min(n, rank() * per_rank)
    return start, min(n, start + per_rank)


def padded_shard(n: int) -> tuple[list[int], int]:
    """This rank's indices under :func:`shard_range`, padded by repetition to the largest shard size.

    Returns ``(indices, n_real)``: only the first ``n_real`` results are kept. Every rank thus runs
    the same number of forward passes, which ZeRO-3 (parameters gathered inside each forward) needs
    to avoid a hang; a rank with an empty shard computes on item 0 and discards it.
    """
    if n <= 0:
        raise ValueError("cannot shard an empty collection")
    start, stop = shard_range(n)
    longest = min(n, -(-n // world_size()))
    real = list(range(start, stop))
    return real + [real[-1] if real else 0] * (longest - len(real)), len(real)


def all_gather_rows(local: torch.Tensor, total_rows: int) -> torch.Tensor:
    """Concatenates the row shards produced under :func:`shard_range` back into one tensor.

    Implemented as a sum of zero-padded copies so that ranks with fewer (or zero) rows need no
    special case and the result is identical, in rank order, on every rank.
    """
    if not is_distributed():
        return local
    start, stop = shard_range(total_rows)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows but its shard is {stop - start}")
    full = local.new_zeros((total_rows, *local.shape[1:]))
    full[start:stop] = local
    return all_reduce_sum(full)
