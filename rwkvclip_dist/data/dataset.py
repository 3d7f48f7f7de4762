"""StreamingDataset over the MDS column contract: decode, augment, pick one text, tokenize.

Yields ``(image [3,S,S] float, tokens [77] long, text_id int)``.
All per-sample randomness (crop, flip, text choice) is a function of ``(seed, epoch, sample_id)``, so
the samples after a mid-epoch resume are bit-identical to those of the uninterrupted run.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from rwkvclip_dist.data.columns import TEXT_COLUMNS, TEXT_ID
from rwkvclip_dist.data.streaming_compat import (EpochAwareDataset, SharedScalar, install_dataset_patches,
                                                 node_shared_name, shard_is_local)
from rwkvclip_dist.data.tokenizer import CONTEXT_LENGTH, tokenize

log = logging.getLogger(__name__)
CORRUPT_SHM = "rwkvclip_corrupt"
STAND_IN = -1
"""``text_id`` of a stand-in for an undecodable sample: the trainer leaves it out of the loss."""


class CorruptSample:
    """Returned by ``get_item`` for a row that cannot be decoded; ``__iter__`` never yields it."""

    def __init__(self, sample_id: int, key: str, error: str) -> None:
        self.sample_id, self.key, self.error = sample_id, key, error

    def __repr__(self) -> str:
        return f"CorruptSample(id={self.sample_id}, key={self.key!r}, {self.error})"


class NodeCounter:
    """A count shared by every process of a node (its ranks and their loader workers), in shared memory.

    An increment is a read and a write: from several workers at once, without the lock, two of them
    read the same value and one count is lost. The lock is ``flock`` on the segment's own file, so
    nothing but the segment is created, and it is released when the descriptor closes, even in a
    process that dies holding it.
    """

    def __init__(self, name: str) -> None:
        self._scalar = SharedScalar(np.int64, name)
        self._file = f"/dev/shm/{name}"  # where Linux keeps the POSIX segment Streaming created

    @property
    def value(self) -> int:
        return int(self._scalar.get())

    def add(self, n: int = 1) -> None:
        fd = os.open(self._file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._scalar.set(self._scalar.get() + n)
        finally:
            os.close(fd)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A few integer ops per sample; numpy's SeedSequence/Generator cost ~30 us per sample here.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seeds(seed: int, epoch: int, sample_id: int) -> tuple[float, int]:
    """(uniform in [0, 1) for the text choice, 63-bit torch seed for the augmentation) of one sample."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ sample_id)
    return (h >> 11) / float(1 << 53), _splitmix64(h) >> 1


def choose_text(texts: dict[str, str], weights: dict[str, float], u: float) -> str:
    """Pick a text kind among the non-empty ones, with ``weights`` renormalised over them.

    ``u`` is uniform in [0, 1). A sample whose texts all have weight 0 falls back to a uniform choice
    among the texts it has, so a missing text is never picked and a sample is never dropped for it.
    """
    avail = [k for k in TEXT_COLUMNS if texts.get(k)]
    if not avail:
        raise ValueError("sample has no text")
    w = [max(weights.get(k, 0.0), 0.0) for k in avail]
    total = sum(w)
    if total <= 0:
        w, total = [1.0] * len(avail), float(len(avail))
    target = u * total
    for kind, wk in zip(avail, w):
        if target < wk:
            return kind
        target -= wk
    return next(k for k, wk in zip(reversed(avail), reversed(w)) if wk > 0)  # u*total rounding


class ThreeTextDataset(EpochAwareDataset):
    """Streaming image-text dataset with per-sample text choice (SPEC section 8)."""

    def __init__(self, *, transform: Callable, text_weights: dict[str, float] | None = None,
                 sample_seed: int = 0, context_length: int = CONTEXT_LENGTH, **streaming_kwargs: Any) -> None:
        self._known_local: set[int] = set()  # shards this process has seen prepared (prepare_shard)
        install_dataset_patches()  # O(shards) sample->shard map; node-locked prefix registration
        super().__init__(**streaming_kwargs)
        self.transform = transform
        self.text_weights = dict(text_weights or {k: 1.0 for k in TEXT_COLUMNS})
        self.sample_seed = sample_seed
        self.context_length = context_length
        self._epoch = 0
        # Node-wide counter in shared memory, so worker processes' replacements reach the trainer.
        self.corrupt_counter = NodeCounter(node_shared_name(self, CORRUPT_SHM))

    @property
    def num_corrupt(self) -> int:
        """Samples that failed to decode and were replaced by the worker's previous good sample, on this
        node since the dataset was built (the trainer reports the total in ``metrics.json``)."""
        return self.corrupt_counter.value

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming's prefetch thread calls this for every sample: a file lock, a stat of the shard
        # file and an access-time update each time, about 10% of a core at ~500 samples/s. Without a
        # cache limit nothing ever evicts a shard, so once this process has seen it local there is
        # nothing left to check.
        if self.cache_limit is None and shard_id in self._known_local:
            return
        super().prepare_shard(shard_id, blocking)
        if shard_is_local(self, shard_id):
            self._known_local.add(shard_id)

    def on_epoch(self, epoch: int) -> None:
        # The only place a worker learns its epoch; it seeds the per-sample randomness below.
        self._epoch = epoch

    def decode(self, row: dict[str, Any], sample_id: int) -> tuple:
        """Turn one MDS row into model inputs; raises on an undecodable image."""
        u, torch_seed = sample_seeds(self.sample_seed, self._epoch, int(sample_id))
        texts = {k: row.get(k) or "" for k in TEXT_COLUMNS}
        kind = choose_text(texts, self.text_weights, u)
        # Not loaded here: the transform decodes, at reduced scale where its crop allows.
        img = Image.open(io.BytesIO(row["jpg"]))
        # torchvision draws from the global CPU torch RNG; fork it so the main process's RNG (dropout,
        # init) is untouched when num_workers=0, and seed it per sample for exact resumption.
        # (torch.manual_seed would also queue lazy CUDA/XPU seeding with a stack trace per call.)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch_seed)
            image = self.transform(img)
        tokens = tokenize(texts[kind], self.context_length)[0]
        return image, tokens, TEXT_ID[kind]

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        row = super().get_item(sample_id, retry)
        try:
            return self.decode(row, sample_id)
        except (OSError, SyntaxError, ValueError) as e:
            return CorruptSample(sample_id, str(row.get("key")), f"{type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[tuple]:
        """Iterate this worker's partition, replacing undecodable samples.

        A bad sample is replaced by a copy of the worker's previous good one (or its next, at the
        start) rather than dropped: every rank then keeps the same batch size and the sample position
        that Streaming checkpoints stays exact. The copy's ``text_id`` is :data:`STAND_IN`, so the
        trainer excludes it from the contrastive loss, where it would be a false negative of its
        original. Each replacement is logged and counted (``num_corrupt``).
        """
        last = None
        owed = 0
        for item in super().__iter__():
            if isinstance(item, CorruptSample):
                self.corrupt_counter.add()
                log.warning("undecodable sample %r: replaced by a neighbouring good sample", item)
                if last is None:
                    owed += 1
                else:
                    yield _stand_in(last)
                continue
            last = item
            yield item
            for _ in range(owed):
                yield _stand_in(item)
            owed = 0
        if owed:
            raise RuntimeError(f"all {owed} samples of a data-loader worker's partition failed to "
                               f"decode; the shards are damaged (see the warnings above)")


def _stand_in(item: tuple) -> tuple:
    return item[:2] + (STAND_IN,) + item[3:]
