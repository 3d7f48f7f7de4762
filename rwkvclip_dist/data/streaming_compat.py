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
is ``data/counting_loader.py``'s: Streaming's interface (samples counted per rank, the dataset's
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

import fcntl
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from tempfile import gettempdir
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from rwkvclip_dist.versions import require_version

WRITTEN_FOR = ("0.13", "0.14")
"""Lowest version read, first version not read (pyproject.toml's bounds; CI runs 0.13.0)."""

log = logging.getLogger(__name__)

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
from streaming.base.constant import LOCALS, SHM_TO_CLEAN, TICK  # noqa: E402
from streaming.base.dataset import _ShardState  # noqa: E402
from streaming.base.format import FileInfo, Reader, get_index_basename, reader_from_json  # noqa: E402
from streaming.base.format.mds import MDSReader  # noqa: E402
from streaming.base.shared import SharedMemory, SharedScalar  # noqa: E402
from streaming.base.shared import prefix as shm_prefix  # noqa: E402
from streaming.base.shared.prefix import _get_path, get_shm_prefix  # noqa: E402
from streaming.base.compression import decompress  # noqa: E402
from streaming.base.format.mds.encodings import mds_decode  # noqa: E402
from streaming.base.util import merge_index, wait_for_file_to_exist  # noqa: E402
from streaming.base.world import World  # noqa: E402

__all__ = ["LocalDataset", "MDSWriter", "Stream", "StreamingDataset", "SharedScalar", "World",
           "decompress", "mds_decode", "merge_index", "reader_from_json",
           "CompactSpanner", "EpochAwareDataset", "IndexedStream", "Reader", "install_dataset_patches", "mds_reader",
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


PREFIX_LOCK = "rwkvclip_streaming_prefix.lock"  # in the temporary folder, beside Streaming's lock files
PREFIX_LOCK_WAIT_S = 60.0


def _node_shm_prefix(streams_local: list[str], streams_remote: list[str | None], world: World,
                     retry: int = 100) -> tuple[int, SharedMemory]:
    """Streaming's ``get_shm_prefix`` with the node's registrations one at a time.

    Streaming's ranks each scan the node's shared-memory names for the first free prefix, then the local
    leader creates it: two jobs starting together (two test workers, two runs on a node) pick the same
    prefix and one fails, ``[Errno 17] File exists: '/000000_locals'``. Here each local leader scans and
    creates under a node-wide ``flock`` (no collective while it is held: two "nodes" of one job may share
    a machine) and the other ranks learn their leader's prefix from one all-gather; a prefix taken by a
    registrant outside the lock (stock Streaming) is scanned for again. A leader's failure (a reused local
    directory) reaches its node's ranks instead of leaving them in the collective."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world.num_ranks > 1 and not distributed:
        return get_shm_prefix(streams_local, streams_remote, world, retry)  # nothing to coordinate with
    shm_prefix._check_self(streams_local)
    prefix, shm, failure = -1, None, None
    if world.is_local_leader:
        lock = _node_lock()
        try:
            for attempt in range(retry + 1):
                prefix = max(shm_prefix._check_and_find_retrying(streams_local, streams_remote, name, retry)
                             for name in SHM_TO_CLEAN)
                data = shm_prefix._pack_locals(streams_local, prefix)
                try:
                    shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
                    break
                except FileExistsError:  # taken by a registrant outside the lock (stock Streaming): scan again
                    if attempt == retry:
                        raise
            shm.buf[:len(data)] = data
        except Exception as err:  # noqa: BLE001 - raised below, after the ranks of the node heard of it
            prefix, failure = -2, err
        finally:
            if lock is not None:
                os.close(lock)  # closing releases the flock
    if distributed:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.tensor([world.node, prefix], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(every, mine)
        if not world.is_local_leader:
            prefix = next(p for n, p in (t.tolist() for t in every) if n == world.node and p != -1)
            if prefix == -2:
                raise RuntimeError("the node's local leader could not register Streaming's shared memory; "
                                   "its error says why")
            shm = SharedMemory(_get_path(prefix, LOCALS), False)
            if shm_prefix._unpack_locals(bytes(shm.buf)) != (streams_local, prefix):
                raise RuntimeError(f"Streaming shared memory prefix {prefix}: registered for other streams than "
                                   f"{streams_local} (ranks of one node must give the same data.streams)")
    if failure is not None:
        raise failure
    return prefix, shm


def _node_lock() -> int | None:
    """A file descriptor holding :data:`PREFIX_LOCK`, or None (with a warning) when it cannot be had."""
    path = os.path.join(gettempdir(), PREFIX_LOCK)
    try:  # read-only: another user's lock file may be read, and /tmp refuses O_CREAT on it
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as err:
            log.warning("cannot create %s (%s): registering Streaming's shared-memory prefix without it", path, err)
            return None
    except OSError as err:
        log.warning("cannot open %s (%s): registering Streaming's shared-memory prefix without it", path, err)
        return None
    deadline = time.monotonic() + PREFIX_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("%s held for over %.0f s (a stopped process?): registering Streaming's shared-memory "
                            "prefix without it", path, PREFIX_LOCK_WAIT_S)
                os.close(fd)
                return None
            time.sleep(0.02)


def install_dataset_patches() -> None:
    """Make ``StreamingDataset`` build a :class:`CompactSpanner` and register its shared-memory prefix
    under the node lock of :func:`_node_shm_prefix` (idempotent; the version was checked when this
    module was imported)."""
    import streaming.base.dataset as dataset_module

    dataset_module.Spanner = CompactSpanner
    dataset_module.get_shm_prefix = _node_shm_prefix


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
