"""Typed configuration of the data side (the ``data:`` section of a recipe).

Fields are plain types so a recipe YAML maps onto them one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rwkvclip_dist.data.columns import TEXT_COLUMNS
from rwkvclip_dist.typed_config import FieldError, path_field


@dataclass
class StreamConfig:
    """One MDS data source mixed into training (e.g. LAION, YFCC)."""

    remote: str = path_field(exists="dir", inside="index.json")
    """Where the shards live: a local directory, ``s3://``, ``gs://``, ... (anything Streaming reads)."""

    local: str | None = path_field(None)
    """Local cache directory for a remote stream; ``None`` reads a local ``remote`` in place."""

    proportion: float | None = None
    """Relative weight in the mix: the epoch (``data.epoch_size``, else the sum of all streams' sizes)
    takes ``floor(epoch * p / sum(p))`` samples from this stream, the remainder spread by a seeded
    draw. Set on every stream or on none; cannot be combined with ``repeat``/``choose``."""

    repeat: float | None = None
    """Absolute weight: ``int(repeat * stream size)`` samples per epoch (2.5 = every sample twice, half
    of them a third time; 0.5 = a seeded half). Streams without a weight count once."""

    choose: int | None = None
    """Absolute weight: exactly this many samples from this stream per epoch."""


@dataclass
class DataConfig:
    """The training input pipeline: streams, text choice, shuffling and loader workers."""

    streams: list[StreamConfig] = field(default_factory=list)
    """MDS streams to mix; at least one is needed to build a loader."""

    batch_size: int = 256
    """Samples per rank per step (the global batch is this times the world size)."""

    text_weights: dict[str, float] = field(
        default_factory=lambda: {"raw": 1.0, "synthetic": 1.0, "generated": 1.0})
    """Relative chance of training on each text kind; renormalised over the texts a sample has."""

    shuffle: bool = True
    """Shuffle samples each epoch (Streaming's shuffle; the order is a function of the seed)."""

    shuffle_algo: Literal["py1e", "py1br", "py1s", "py2s", "naive"] = "py1e"
    """Streaming shuffle algorithm (``streaming.base.shuffle.algos``)."""

    shuffle_seed: int = 9176
    """Seed of the sample order (the training seed drives crops, flips and the text choice)."""

    shuffle_block_size: int | None = None
    """Samples per shuffle block; ``None`` lets Streaming choose (about 262k)."""

    epoch_size: int | None = None
    """Samples per epoch over all streams; ``None`` is one pass over every stream."""

    sampling_granularity: int = 1
    """When an epoch takes part of a stream (``epoch_size``, ``choose``, ``proportion``), Streaming picks
    its samples in runs of this many from one shard; its pick list holds one entry per run of the whole
    stream, so at LAION-2B scale (2.3 billion samples) 1 needs tens of GiB per node: use about the
    samples of a shard there (docs/data.md, "Large indexes")."""

    num_workers: int = 4
    """DataLoader worker processes per rank (decode and augmentation run there)."""

    predownload: int | None = None
    """Samples to download ahead per worker; ``None`` is Streaming's default (8 x batch size)."""

    cache_limit: str | None = None
    """Cap on the local cache (e.g. ``"200gb"``); older shards are evicted past it."""

    hflip: float = 0.5
    """Horizontal flip probability of the training transform (SPEC: 0.5)."""

    image_size: int | None = None
    """Training resolution in pixels; ``None`` takes the model's ``image.image_size``."""

    num_canonical_nodes: int | None = None
    """Streaming's canonical node count; fix it to keep the sample order when the node count changes."""

    download_timeout: float = 60.0
    """Seconds to wait for one shard download before failing."""

    def _check_ranges(self) -> None:
        at_least = {"num_workers": 0, "shuffle_seed": 0, "shuffle_block_size": 1, "num_canonical_nodes": 1,
                    "image_size": 1, "predownload": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise FieldError(name, f"must be >= {low}, got {value}")
        if not 0 <= self.hflip <= 1:
            raise FieldError("hflip", f"is a probability, must be in [0, 1], got {self.hflip}")
        if not self.download_timeout > 0:
            raise FieldError("download_timeout", f"must be > 0 seconds, got {self.download_timeout}")

    def __post_init__(self) -> None:
        self.streams = [s if isinstance(s, StreamConfig) else StreamConfig(**s) for s in self.streams]
        self._check_ranges()
        unknown = set(self.text_weights) - set(TEXT_COLUMNS)
        if unknown:
            raise FieldError("text_weights", f"unknown text kind(s) {sorted(unknown)}; "
                             f"expected keys among {list(TEXT_COLUMNS)}")
        bad = {k: v for k, v in self.text_weights.items() if not v >= 0}
        if bad:
            raise FieldError("text_weights", f"weights must be >= 0, got {bad}")
        if not any(v > 0 for v in self.text_weights.values()):
            raise FieldError("text_weights", "at least one weight must be positive")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        check_stream_weights(self.streams, self.epoch_size)


def check_stream_weights(streams: list[StreamConfig], epoch_size: int | None) -> None:
    """Reject the weightings Streaming cannot mix, naming the recipe key (Streaming's own errors
    name neither the recipe nor the stream)."""
    weights = ("proportion", "repeat", "choose")
    for i, s in enumerate(streams):
        given = [w for w in weights if getattr(s, w) is not None]
        if len(given) > 1:
            raise FieldError(f"streams[{i}]", f"set at most one of proportion, repeat, choose "
                             f"(got {' and '.join(given)})")
        for w in given:
            if not getattr(s, w) >= 0:
                raise FieldError(f"streams[{i}].{w}", f"must be >= 0, got {getattr(s, w)}")
    relative = [s.proportion is not None for s in streams]
    if any(relative) and not all(relative):
        i = relative.index(False)
        raise FieldError(f"streams[{i}]", f"has no proportion while data.streams[{relative.index(True)}] has "
                         f"one; proportion (relative) must be set on every stream or on none")
    if all(relative) and streams and not sum(s.proportion for s in streams) > 0:
        raise FieldError("streams", "at least one proportion must be positive")
    absolute = [i for i, s in enumerate(streams) if s.repeat is not None or s.choose is not None]
    if absolute and epoch_size is not None:
        kind = "repeat" if streams[absolute[0]].repeat is not None else "choose"
        raise FieldError("epoch_size", f"{epoch_size} cannot be combined with data.streams[{absolute[0]}].{kind}: "
                         f"repeat and choose fix the epoch size themselves; use proportion to mix into a given "
                         f"epoch size")
    if epoch_size is not None and epoch_size < 1:
        raise FieldError("epoch_size", f"must be >= 1, got {epoch_size}")
