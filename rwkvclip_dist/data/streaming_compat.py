"""The one private name of MosaicML Streaming that this project replaces, checked against its version.

Streaming 0.13 builds its ``Spanner`` (global sample index -> shard and index in it) on every rank as
``np.repeat(arange(shards), shard_sizes)``: one int64 per sample, then cut into one numpy array per
1,024 samples. For LAION-2B (230,000 shards, 2.3 billion samples) that asks for 18 GiB per rank
before the first batch (measured: ``Unable to allocate 25.7 GiB`` at 3.45 billion samples), and keeps
2.2 million small arrays. :class:`CompactSpanner` answers the same question with a binary search
over the shards' cumulative sizes: 8 bytes per shard, the same answers (tests/test_index_scale.py).
"""
from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)
TESTED_VERSIONS = ("0.13.",)


class CompactSpanner:
    """Streaming's ``Spanner`` interface (``spanner[index] -> (shard, index in shard)``) in O(shards)."""

    def __init__(self, shard_sizes: NDArray[np.int64], span_size: int = 1 << 10) -> None:
        self.shard_sizes = shard_sizes
        self.num_samples = int(shard_sizes.sum())
        self.shard_bounds = np.concatenate([np.zeros(1, np.int64), shard_sizes.cumsum()])

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        # side="right": an empty shard shares its bound with the next one, which holds the sample.
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1
        return shard, int(index - self.shard_bounds[shard])


def install() -> None:
    """Make ``StreamingDataset`` build a :class:`CompactSpanner` (idempotent)."""
    import streaming
    import streaming.base.dataset as dataset_module

    if dataset_module.Spanner is CompactSpanner:
        return
    if not streaming.__version__.startswith(TESTED_VERSIONS):
        raise RuntimeError(f"mosaicml-streaming {streaming.__version__} is installed; "
                           f"rwkvclip_dist/data/streaming_compat.py was checked with {TESTED_VERSIONS} only")
    dataset_module.Spanner = CompactSpanner
