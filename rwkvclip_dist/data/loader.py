"""The training data loader over MDS streams (evaluation reads labelled MDS through ``eval/datasets.py``).

Rank and world come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as Streaming
reads them. The returned ``StreamingDataLoader`` counts the samples it yielded; for a checkpoint call
``loader.state_dict()`` (or ``dataset.state_dict(num_samples, from_beginning)``) and on resume
``loader.load_state_dict(state)`` before iterating: every rank then continues with exactly the samples
the uninterrupted run would have seen next.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.parse
from typing import Any, Callable

import torch

from rwkvclip_dist.data.config import DataConfig, StreamConfig
from rwkvclip_dist.data.dataset import ThreeTextDataset
from rwkvclip_dist.data.index_check import Checked, check_local_indexes_once_per_node, shards_for_stream
from rwkvclip_dist.data.counting_loader import StreamingDataLoader
from rwkvclip_dist.data.streaming_compat import IndexedStream
from rwkvclip_dist.data.transforms import train_transform

log = logging.getLogger(__name__)


def _stream(sc: StreamConfig, download_timeout: float, read_index: Callable) -> IndexedStream:
    is_remote = bool(urllib.parse.urlparse(sc.remote).scheme)
    if not is_remote:
        if not os.path.isfile(os.path.join(sc.remote, "index.json")):
            raise FileNotFoundError(f"data stream {sc.remote!r}: no index.json (build it with "
                                    f"tools/make_shards.py)")
        if sc.local is None:
            # A local directory is read in place; Streaming wants it as `local` then.
            return IndexedStream(local=sc.remote, proportion=sc.proportion, repeat=sc.repeat, choose=sc.choose,
                                 download_timeout=download_timeout, read_index=read_index)
    # Every index, remote ones too, is checked as it is read: before Streaming downloads (and
    # writes) any shard it names.
    return IndexedStream(remote=sc.remote, local=sc.local, proportion=sc.proportion, repeat=sc.repeat,
                         choose=sc.choose, download_timeout=download_timeout, read_index=read_index)


def _remote_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # not found, timeouts, refused connections
    try:  # boto3 comes with Streaming's S3 support; without it s3:// streams fail in Streaming itself
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return tuple(errors)
    return (*errors, BotoCoreError, ClientError)


def _open_dataset(configs: list[StreamConfig], **kwargs: Any) -> ThreeTextDataset:
    """``ThreeTextDataset(**kwargs)`` over the streams ``configs``; a remote index that cannot be read
    becomes one clear line naming the streams (Streaming raises boto3's error with a long traceback)."""
    try:
        return ThreeTextDataset(**kwargs)
    except _remote_errors() as err:
        remotes = [s.remote for s in configs if urllib.parse.urlparse(s.remote).scheme]
        if not remotes:
            raise
        first = (str(err).splitlines() or [type(err).__name__])[0]
        hint = ("; for an S3-compatible server set S3_ENDPOINT_URL and the AWS credentials (docs/data.md)"
                if any(r.startswith("s3://") for r in remotes) else "")
        missing = isinstance(err, FileNotFoundError) or "not found" in first.lower()
        message = f"data.streams: cannot open remote stream(s) {', '.join(remotes)}: {first}{hint}"
        raise (FileNotFoundError if missing else ConnectionError)(message) from err


def _check_columns(dataset: ThreeTextDataset, needed: tuple[str, ...]) -> None:
    seen: set[int] = set()  # the shards of an index share their column list (data/index_check.py)
    for stream, shard in zip(dataset.stream_per_shard, dataset.shards):
        if id(shard.column_names) in seen:
            continue
        seen.add(id(shard.column_names))
        missing = [c for c in needed if c not in shard.column_names]
        if missing:
            where = dataset.streams[stream].remote or dataset.streams[stream].local
            raise ValueError(f"data stream {where!r}: shard {shard.raw_data.basename} lacks column(s) "
                             f"{missing} (see docs/data.md)")


def _warn_if_cache_thrashes(cfg: DataConfig, dataset: ThreeTextDataset) -> None:
    """A shuffle block wider than the cache makes every shard be fetched again and again per epoch
    (measured: 2,391 downloads of 14 shards in a 2,048-sample epoch; benchmarks/input_pipeline.md)."""
    total = sum(shard.raw_data.bytes for shard in dataset.shards)
    if not cfg.shuffle or not dataset.cache_limit or dataset.cache_limit >= total:
        return
    fits = dataset.cache_limit * dataset.num_samples // total
    if cfg.shuffle_block_size is None or cfg.shuffle_block_size > fits // 2:
        block = cfg.shuffle_block_size or "Streaming's default (>= 262144)"
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("data.cache_limit=%s holds about %d of the %d samples but data.shuffle_block_size is %s: "
                        "shards will be evicted and fetched many times per epoch; set data.shuffle_block_size "
                        "to at most %d (docs/data.md, Object stores)", cfg.cache_limit, fits,
                        dataset.num_samples, block, max(fits // 2, 1))


def build_train_dataloader(cfg: DataConfig, image_size: int, seed: int, replication: int = 1
                           ) -> tuple[StreamingDataLoader, ThreeTextDataset]:
    """Shuffled, augmented loader of ``(image, tokens, text_id)`` batches of ``cfg.batch_size``.

    ``seed`` (the training seed) drives crops, flips and the text choice; ``cfg.shuffle_seed`` the order.
    ``replication``: this many consecutive ranks get the same samples (Streaming's ``replication``:
    the ranks of a tensor-parallel group), so the data is partitioned over the data-parallel ranks;
    the loader's ``state_dict`` counts each replicated sample once.
    """
    if not cfg.streams:
        raise ValueError("data.streams is empty: give at least one MDS stream")
    checked: Checked = {}  # local rank 0's check hands its readers to its dataset; dropped with this frame
    streams = [_stream(s, cfg.download_timeout, functools.partial(shards_for_stream, checked)) for s in cfg.streams]
    check_local_indexes_once_per_node([s.remote for s in cfg.streams if not urllib.parse.urlparse(s.remote).scheme],
                                      checked)
    try:
        dataset = _open_dataset(
            cfg.streams, transform=train_transform(cfg.image_size or image_size, hflip=cfg.hflip),
            text_weights=cfg.text_weights, sample_seed=seed,
            streams=streams, epoch_size=cfg.epoch_size, predownload=cfg.predownload, cache_limit=cfg.cache_limit,
            batch_size=cfg.batch_size, shuffle=cfg.shuffle, shuffle_algo=cfg.shuffle_algo,
            shuffle_seed=cfg.shuffle_seed, shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes, download_timeout=cfg.download_timeout,
            sampling_granularity=cfg.sampling_granularity,
            replication=replication if replication > 1 else None)
    except ValueError as err:
        # Streaming sizes the cache check against the shards; its message names no recipe key.
        if cfg.cache_limit is not None and "cache limit" in str(err).lower():
            raise ValueError(f"data.cache_limit={cfg.cache_limit!r}: {err}") from err
        raise
    if dataset.epoch_size == 0:
        raise ValueError("data.streams: the stream weights (repeat/choose/proportion) select no sample per epoch")
    _warn_if_cache_thrashes(cfg, dataset)
    _check_columns(dataset, ("jpg", "raw", "synthetic", "generated"))
    # Its own generator: a DataLoader draws its workers' base seed from torch's global stream each
    # time an iterator starts, which would shift the stochastic-depth masks of a resumed run (its
    # iterator starts after the RNG restore). The samples' randomness is per sample (dataset.py).
    loader = StreamingDataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 drop_last=True, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(seed))
    return loader, dataset
