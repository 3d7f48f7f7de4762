"""MosaicML Streaming for the trainer's reader: its classes, imported light, and every use of its
private names, in one place, for the versions they were read from.

Importing this module checks the installed version against ``WRITTEN_FOR`` and refuses, in one line
naming both, when it is outside (tests/test_layout.py checks that no other module touches Streaming's
private names). Widen the range after reading the new release's code for each name here.

The light import: ``streaming/__init__.py`` imports Streaming's ready-made datasets (its C4 dataset
imports transformers' ``AutoTokenizer`` and with it scikit-learn) and ``streaming/base/__init__.py``
imports its DataLoader, whose module imports transformers for two ``isinstance`` checks: together
~1.5-2.5 s and ~300 MB in every training rank, tool and DataLoader worker, for classes no run uses.
:func:`_import_streaming` creates both packages without running those files and imports the modules
the trainer and tools use; ``from streaming import X`` gives the same objects, and what was skipped
(``StreamingDataLoader``, ``streaming.text`` & co.) still imports on first access. The trainer's loader
is :class:`StreamingDataLoader` here: Streaming's interface (samples counted per rank, the dataset's
``state_dict`` at that count), without transformers.

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader

from rwkvclip_dist.versions import require_version

WRITTEN_FOR = ("0.13", "0.14")
"""Lowest version read, first version not read (pyproject.toml's bounds; CI runs 0.13.0)."""

require_version("mosaicml-streaming", WRITTEN_FOR, "rwkvclip_dist/data/streaming_compat.py")


_BASE = {"StreamingDataset": "dataset", "Stream": "stream", "LocalDataset": "local", "CSVWriter": "format",
         "JSONWriter": "format", "MDSWriter": "format", "TSVWriter": "format", "XSVWriter": "format"}
"""``streaming.base``'s exports (its ``__all__``) by the module that defines them, ..."""
_SKIPPED = {"StreamingDataLoader": "streaming.base.dataloader"}
"""... but for those imported only when asked for."""


def _bare_package(name: str):
    """``name``'s package module, registered without running its ``__init__.py``."""
    package = importlib.util.module_from_spec(importlib.util.find_spec(name))
    sys.modules[name] = package
    return package


def _import_streaming() -> None:
    if "streaming" in sys.modules:
        return
    try:
        package, base = _bare_package("streaming"), _bare_package("streaming.base")
        # streaming/base/__init__.py's own imports, but for the DataLoader's (transformers).
        for module in ("dataset", "format", "local", "stream"):
            importlib.import_module(f"streaming.base.{module}")
        package.__version__ = importlib.import_module("streaming._version").__version__
    except BaseException:
        for name in [n for n in sys.modules if n == "streaming" or n.startswith("streaming.")]:
            del sys.modules[name]
        raise
    for name, module in _BASE.items():
        value = getattr(sys.modules[f"streaming.base.{module}"], name)
        setattr(base, name, value)
        setattr(package, name, value)
    base.__all__ = [*_BASE, *_SKIPPED]
    package.base = base

    def skipped(attr: str, prefix: str):
        if attr in _SKIPPED:
            return getattr(importlib.import_module(_SKIPPED[attr]), attr)
        try:  # a submodule not imported yet (streaming.text, streaming.base.util, ...)
            return importlib.import_module(f"{prefix}.{attr}")
        except ModuleNotFoundError as err:
            raise AttributeError(f"module {prefix!r} has no attribute {attr!r}") from err

    package.__getattr__ = lambda attr: skipped(attr, "streaming")
    base.__getattr__ = lambda attr: skipped(attr, "streaming.base")


_import_streaming()

from streaming.base import LocalDataset, MDSWriter, Stream, StreamingDataset  # noqa: E402
from streaming.base.constant import TICK  # noqa: E402
from streaming.base.dataset import _ShardState  # noqa: E402
from streaming.base.format import FileInfo, Reader, get_index_basename, reader_from_json  # noqa: E402
from streaming.base.format.mds import MDSReader  # noqa: E402
from streaming.base.shared import SharedScalar  # noqa: E402
from streaming.base.shared.prefix import _get_path  # noqa: E402
from streaming.base.compression import decompress  # noqa: E402
from streaming.base.format.mds.encodings import mds_decode  # noqa: E402
from streaming.base.util import merge_index, wait_for_file_to_exist  # noqa: E402
from streaming.base.world import World  # noqa: E402

__all__ = ["LocalDataset", "MDSWriter", "Stream", "StreamingDataLoader", "StreamingDataset", "SharedScalar",
           "decompress", "mds_decode", "merge_index", "reader_from_json",
           "CompactSpanner", "EpochAwareDataset", "IndexedStream", "Reader", "install_compact_spanner", "mds_reader",
           "node_shared_name", "shard_is_local"]


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
