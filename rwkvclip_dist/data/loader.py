"""Train and eval data loaders over MDS streams.

Rank and world come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as Streaming
reads them. The returned ``StreamingDataLoader`` counts the samples it yielded; for a checkpoint call
``loader.state_dict()`` (or ``dataset.state_dict(num_samples, from_beginning)``) and on resume
``loader.load_state_dict(state)`` before iterating: every rank then continues with exactly the samples
the uninterrupted run would have seen next.
"""

from __future__ import annotations

import os
import urllib.parse

from streaming import Stream, StreamingDataLoader

from rwkvclip_dist.data.config import DataConfig, StreamConfig
from rwkvclip_dist.data.dataset import ThreeTextDataset
from rwkvclip_dist.data.index_check import check_local_index, safe_basename
from rwkvclip_dist.data.transforms import eval_transform, train_transform


def _stream(sc: StreamConfig, download_timeout: float) -> Stream:
    is_remote = bool(urllib.parse.urlparse(sc.remote).scheme)
    if not is_remote:
        if not os.path.isfile(os.path.join(sc.remote, "index.json")):
            raise FileNotFoundError(f"data stream {sc.remote!r}: no index.json (build it with "
                                    f"tools/make_shards.py)")
        check_local_index(sc.remote)
        if sc.local is None:
            # A local directory is read in place; Streaming wants it as `local` then.
            return Stream(local=sc.remote, proportion=sc.proportion, repeat=sc.repeat, choose=sc.choose,
                          download_timeout=download_timeout)
    return Stream(remote=sc.remote, local=sc.local, proportion=sc.proportion, repeat=sc.repeat,
                  choose=sc.choose, download_timeout=download_timeout)


def _check_shard_names(dataset: ThreeTextDataset) -> None:
    # Remote indexes too, before Streaming downloads (and writes) any shard they name.
    for i, (stream, shard) in enumerate(zip(dataset.stream_per_shard, dataset.shards)):
        for data in (shard.raw_data, shard.zip_data):
            if data is not None:
                where = dataset.streams[stream].remote or dataset.streams[stream].local
                safe_basename(f"{where}/index.json", f"shard {i} basename", data.basename)


def _check_columns(dataset: ThreeTextDataset, needed: tuple[str, ...]) -> None:
    _check_shard_names(dataset)
    for stream, shard in zip(dataset.stream_per_shard, dataset.shards):
        missing = [c for c in needed if c not in shard.column_names]
        if missing:
            where = dataset.streams[stream].remote or dataset.streams[stream].local
            raise ValueError(f"data stream {where!r}: shard {shard.raw_data.basename} lacks column(s) "
                             f"{missing} (see docs/data.md)")


def build_train_dataloader(cfg: DataConfig, image_size: int, seed: int
                           ) -> tuple[StreamingDataLoader, ThreeTextDataset]:
    """Shuffled, augmented loader of ``(image, tokens, text_id)`` batches of ``cfg.batch_size``.

    ``seed`` (the training seed) drives crops, flips and the text choice; ``cfg.shuffle_seed`` the order.
    """
    if not cfg.streams:
        raise ValueError("data.streams is empty: give at least one MDS stream")
    dataset = ThreeTextDataset(
        transform=train_transform(cfg.image_size or image_size, hflip=cfg.hflip),
        text_weights=cfg.text_weights, sample_seed=seed,
        streams=[_stream(s, cfg.download_timeout) for s in cfg.streams],
        epoch_size=cfg.epoch_size, predownload=cfg.predownload, cache_limit=cfg.cache_limit,
        batch_size=cfg.batch_size, shuffle=cfg.shuffle, shuffle_algo=cfg.shuffle_algo,
        shuffle_seed=cfg.shuffle_seed, shuffle_block_size=cfg.shuffle_block_size,
        num_canonical_nodes=cfg.num_canonical_nodes, download_timeout=cfg.download_timeout)
    _check_columns(dataset, ("jpg", "raw", "synthetic", "generated"))
    loader = StreamingDataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 drop_last=True, persistent_workers=False)
    return loader, dataset


def build_eval_dataloader(remote: str, image_size: int, batch_size: int, *, local: str | None = None,
                          text: str = "raw", with_label: bool | None = None, num_workers: int = 0
                          ) -> tuple[StreamingDataLoader, ThreeTextDataset]:
    """Deterministic held-out loader: eval transform, no shuffle, one fixed text kind.

    Yields ``(image, tokens, text_id)`` or, with labels (default: when the shards have a ``label``
    column), ``(image, tokens, text_id, label)``. A sample without the asked-for text uses ``raw``.
    Across ranks, Streaming splits the samples and pads the last ones by repetition to equal counts.
    """
    dataset = ThreeTextDataset(
        transform=eval_transform(image_size), fixed_text=text, with_label=False,
        streams=[_stream(StreamConfig(remote=remote, local=local), 60.0)],
        batch_size=batch_size, shuffle=False)
    has_label = all("label" in s.column_names for s in dataset.shards)
    if with_label and not has_label:
        raise ValueError(f"eval data {remote!r}: with_label=True but the shards have no 'label' column")
    dataset.with_label = has_label if with_label is None else with_label
    _check_columns(dataset, ("jpg", "raw"))
    loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=False)
    return loader, dataset
