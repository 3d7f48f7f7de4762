"""The trainer's ``StreamingDataLoader``: Streaming's interface (samples counted per rank, the dataset's
``state_dict`` at that count) without Streaming's module, which imports transformers for two
``isinstance`` checks (data/streaming_compat.py imports Streaming without it)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from rwkvclip_dist.data.streaming_compat import StreamingDataset, World


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch if isinstance(batch, torch.Tensor) else batch[0])


class StreamingDataLoader(DataLoader):
    """A DataLoader over a ``StreamingDataset`` that counts the samples it yielded on this rank, so that
    ``state_dict()`` is the dataset's position after them (Streaming's ``StreamingDataLoader``
    interface; its module imports transformers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_samples_yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self.num_samples_yielded = 0
        for batch in super().__iter__():
            self.num_samples_yielded += _batch_size(batch)
            yield batch

    def state_dict(self) -> dict[str, Any] | None:
        """The dataset's resumption state after the samples every rank has yielded so far."""
        if not isinstance(self.dataset, StreamingDataset):
            return None
        seen = self.num_samples_yielded * World.detect().num_ranks
        # Ranks that share samples (``replication``) count each of them once.
        return self.dataset.state_dict(seen // (self.dataset.replication or 1), False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.dataset, StreamingDataset):
            self.dataset.load_state_dict(state)
