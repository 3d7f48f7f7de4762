"""MosaicML Streaming for the trainer's reader: its classes, imported light, and every use of its
private names, in one place, for the versions they were read from.

Importing this module checks the installed version against ``WRITTEN_FOR`` and refuses, in one line
naming both, when it is outside (tests/test_layout.py checks that no other module touches Streaming's
private names). Widen the range after reading the new release's code for each name here.

The light import: ``streaming/__init__.py`` also imports Streaming's ready-made datasets, and its C4
dataset imports transformers' ``AutoTokenizer`` and with it scikit-learn, ~1.3 s and ~200 MB in every
training rank and DataLoader worker for classes no run uses. :func:`_import_streaming` creates the
package without running that file and then imports ``streaming.base``, which it exports, so
``from streaming import X`` gives the same objects; ``streaming.text`` & co. still import on request.

The one private piece replaced: Streaming 0.13 builds its ``Spanner`` (global sample index -> shard
and index in it) on every rank as ``np.repeat(arange(shards), shard_sizes)``: one int64 per sample,
then cut into one numpy array per 1,024 samples. For LAION-2B (230,000 shards, 2.3 billion samples)
that asks for 18 GiB per rank before the first batch (measured: ``Unable to allocate 25.7 GiB`` at
3.45 billion samples). :class:`CompactSpanner` answers the same question with a binary search over the
shards' cumulative sizes: 8 bytes per shard, the same answers (tests/test_index_scale.py).

And the reading of an index: Streaming's ``Stream.get_shards`` parses the whole ``index.json``, keeps
the parsed document alive while it deep-copies every shard's entry into a reader, and builds three
new column lists per shard. At 230,000 shards that is ~1 GiB and ~20 s per rank (benchmarks/
index_scale.md). :class:`IndexedStream` keeps Streaming's download-or-wait of the index and hands the
file to a reader of ours (``data/index_check.py``), which builds each shard's reader as the parser
reaches its entry (:func:`mds_reader`, no copy) and shares what shards have in common.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

from rwkvclip_dist.versions import require_version

WRITTEN_FOR = ("0.13", "0.14")
"""Lowest version read, first version not read (pyproject.toml's bounds; CI runs 0.13.0)."""

require_version("mosaicml-streaming", WRITTEN_FOR, "rwkvclip_dist/data/streaming_compat.py")


def _import_streaming() -> None:
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    package = importlib.util.module_from_spec(spec)
    sys.modules["streaming"] = package
    try:
        base = importlib.import_module("streaming.base")
        package.__version__ = importlib.import_module("streaming._version").__version__
    except BaseException:
        sys.modules.pop("streaming", None)
        raise
    package.base = base
    for name in base.__all__:
        setattr(package, name, getattr(base, name))


_import_streaming()

from streaming.base import LocalDataset, MDSWriter, Stream, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.constant import TICK  # noqa: E402
from streaming.base.dataset import _ShardState  # noqa: E402
from streaming.base.format import FileInfo, Reader, get_index_basename, reader_from_json  # noqa: E402
from streaming.base.format.mds import MDSReader  # noqa: E402
from streaming.base.shared import SharedScalar  # noqa: E402
from streaming.base.shared.prefix import _get_path  # noqa: E402
from streaming.base.util import wait_for_file_to_exist  # noqa: E402

__all__ = ["LocalDataset", "MDSWriter", "Stream", "StreamingDataLoader", "StreamingDataset", "SharedScalar",
           "CompactSpanner", "EpochAwareDataset", "IndexedStream", "Reader", "install_compact_spanner", "mds_reader",
           "node_shared_name", "shard_is_local"]


class EpochAwareDataset(StreamingDataset):
    """A ``StreamingDataset`` that tells :meth:`on_epoch` the epoch a worker is about to read: Streaming
    hands it only to the private ``_get_work``, the one place a DataLoader worker learns it."""

    def on_epoch(self, epoch: int) -> None:
        """Called in the reading process before the samples of ``epoch``."""

    def _get_work(self, epoch: int, sample_in_epoch: int) -> Any:
        self.on_epoch(epoch)
        return super()._get_work(epoch, sample_in_epoch)


def shard_is_local(dataset: StreamingDataset, shard_id: int) -> bool:
    """Whether the node's copy of shard ``shard_id`` is complete (Streaming's shared shard states)."""
    return dataset._shard_states[shard_id] == _ShardState.LOCAL


def node_shared_name(dataset: StreamingDataset, name: str) -> str:
    """The shared-memory name of a per-node object ``name`` under ``dataset``'s prefix: the ranks and
    workers of one node that read the same streams see the same object, and Streaming's clean-up (and
    data/shm.py's) covers it."""
    return _get_path(dataset._shm_prefix_int, name)


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


def install_compact_spanner() -> None:
    """Make ``StreamingDataset`` build a :class:`CompactSpanner` (idempotent; the version was checked
    when this module was imported)."""
    import streaming.base.dataset as dataset_module

    dataset_module.Spanner = CompactSpanner


def mds_reader(dirname: str, split: str | None, info: dict[str, Any]) -> Reader:
    """The reader of one shard entry of an index, ``info`` taken as it is (checked by the caller; its
    lists may be shared with other shards): Streaming's ``reader_from_json`` without its deep copy."""
    if info.get("format") != "mds":
        return reader_from_json(dirname, split, info)
    zip_data = info.get("zip_data")
    return MDSReader(dirname, split, info["column_encodings"], info["column_names"], info["column_sizes"],
                     info.get("compression"), info.get("hashes", []), FileInfo(**info["raw_data"]),
                     info["samples"], info.get("size_limit"), FileInfo(**zip_data) if zip_data else None)


class IndexedStream(Stream):
    """A ``Stream`` whose index, once on this node, is read by ``read_index(filename, local, split)``.

    Until the file is there it is Streaming's ``get_shards``: the node's local leader downloads a
    remote index (to ``index.json.tmp``, then renamed), the other ranks wait for the file."""

    def __init__(self, *, read_index: Callable[[str, str, str], list[Reader]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.read_index = read_index

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Reader]:
        basename = get_index_basename()
        filename = os.path.join(self.local, self.split, basename)
        if not os.path.exists(filename):
            if world.is_local_leader:
                if not self.remote:
                    raise RuntimeError(f"No `remote` provided, but local file {filename} does not exist either")
                os.rename(self._download_file(basename, basename + ".tmp"), filename)
            else:
                wait_for_file_to_exist(
                    filename, TICK, self.download_timeout,
                    f"Index file {os.path.join(self.remote or '', self.split or '', basename)} -> {filename} took too "
                    f"long to download or failed to download; raise data.download_timeout or read local rank 0's error")
        shards = self.read_index(filename, self.local, self.split)
        for shard in shards:
            shard.validate(allow_unsafe_types)
        return shards
