"""The samples of a local MDS shard directory, read where they lie: nothing is written.

A compressed shard is decompressed in memory when one of its samples is asked for, and kept until a
sample of another shard is: a reader that goes in order (evaluation, the annotation jobs) decompresses
each shard once and holds at most one. A decompressed copy on disk would be the whole set per process
and per pass, and outlive a process that is killed. Used by ``eval/datasets.py`` and
``descriptions/sources.py``; training reads through Streaming (``loader.py``).
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np
from rwkvclip_dist.data.streaming_compat import decompress, reader_from_json


class LocalShards:
    """Random access to the samples of the MDS directory ``root`` (``index.json`` version 2)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("version") != 2 or "shards" not in index:
            raise ValueError(f"{index_path}: not a version-2 streaming index")
        self.shards, ends = [], []
        for obj in index["shards"]:
            if obj.get("format") != "mds":
                raise ValueError(f"{index_path}: shard format {obj.get('format')!r} is not 'mds'")
            shard = reader_from_json(str(self.root), None, obj)
            if not (self.root / shard.raw_data.basename).is_file():
                stored = (shard.zip_data or shard.raw_data).basename
                if not (self.root / stored).is_file():
                    raise FileNotFoundError(f"{self.root}: index.json names shard file {stored}, which is missing")
            self.shards.append(shard)
            ends.append((ends[-1] if ends else 0) + shard.samples)
        self._ends = ends
        self._held: tuple[int, bytes] | None = None  # (shard, its decompressed bytes)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}  # a worker process decompresses its own

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within the shard) of sample ``index`` of the whole set."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.root}: sample {index} of {len(self)}")
        shard_id = bisect.bisect_right(self._ends, index)
        return shard_id, index - (self._ends[shard_id] - self.shards[shard_id].samples)

    def sample_bytes(self, shard_id: int, local: int) -> bytes:
        """The encoded MDS sample ``local`` of shard ``shard_id``."""
        shard = self.shards[shard_id]
        if (self.root / shard.raw_data.basename).is_file():
            return shard.get_sample_data(local)  # an uncompressed shard: read in place
        if self._held is None or self._held[0] != shard_id:
            packed = (self.root / shard.zip_data.basename).read_bytes()
            self._held = None  # let the previous shard go before the next one is decompressed
            self._held = (shard_id, decompress(shard.compression, packed))
        data = self._held[1]
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=(1 + local) * 4)
        return data[begin:end]

    def sample(self, index: int) -> dict[str, Any]:
        """The decoded MDS row ``index`` of the whole set."""
        shard_id, local = self.locate(index)
        return self.shards[shard_id].decode_sample(self.sample_bytes(shard_id, local))
