"""Large indexes (tools/bench_index_scale.py measures them at LAION-2B scale): the compact sample->shard
map gives Streaming's own answers, our one-pass index reader builds Streaming's own readers (their lists
shared) and hands local rank 0's checked readers to its dataset, a damaged or missing index among 1,000
streams is named, and our index check runs once per node under a process group (local rank 0), its
verdict shared by every rank."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp

from conftest import RANK_ENV, write_shards
from rwkvclip_dist.data.index_check import (ShardIndexError, check_local_index, check_local_indexes_once_per_node,
                                            read_shards, shards_for_stream)
from rwkvclip_dist.data.streaming_compat import CompactSpanner
from rwkvclip_dist.parallel.launch_env import free_port


def test_compact_spanner_answers_as_streamings_spanner():
    from streaming.base.spanner import Spanner

    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 300, 300).astype(np.int64)
    sizes[[0, 7, 8, -1]] = 0  # empty shards, at the start, in a row and at the end
    theirs, ours = Spanner(sizes.copy()), CompactSpanner(sizes.copy())
    total = int(sizes.sum())
    for index in [0, 1, total - 1, *rng.integers(0, total, 2000).tolist()]:
        assert ours[index] == theirs[index], index
    with pytest.raises(IndexError):
        ours[total]


def test_the_one_pass_reader_builds_streamings_own_readers(tmp_path):
    """Every attribute of every reader equals what Streaming's ``reader_from_json`` makes of the same
    entry; the column lists are one object for all shards; the stream's checked readers are what the
    dataset of the process that checked gets, until the file changes."""
    from streaming.base.format import reader_from_json

    directory = tmp_path / "stream"
    write_shards(str(directory), 24, size_limit=1 << 12)
    entries = json.loads((directory / "index.json").read_text())["shards"]
    ours = read_shards(directory / "index.json", str(directory))
    assert len(ours) == len(entries) > 1
    for mine, entry in zip(ours, entries):
        theirs = reader_from_json(str(directory), None, entry)
        assert type(mine) is type(theirs)
        assert {k: v for k, v in vars(mine).items()} == {k: v for k, v in vars(theirs).items()}
    assert len({id(r.column_names) for r in ours}) == 1 and len({id(r.column_encodings) for r in ours}) == 1

    index, checked = str(directory / "index.json"), {}
    mine = check_local_index(directory, checked)
    assert shards_for_stream(checked, index, str(directory), "") is mine and not checked  # taken once
    again = shards_for_stream(checked, index, str(directory), "")
    assert again is not mine and [vars(r) for r in again] == [vars(r) for r in mine]
    mine = check_local_index(directory, checked)
    elsewhere = shards_for_stream(checked, index, str(tmp_path / "elsewhere"), "")  # another local dir
    assert elsewhere is not mine and elsewhere[0].dirname == str(tmp_path / "elsewhere")
    mine = check_local_index(directory, checked)
    os.utime(directory / "index.json", ns=(0, 0))  # changed since the check: read again
    assert shards_for_stream(checked, index, str(directory), "") is not mine


def test_the_loader_of_a_single_process_reads_each_index_once(tmp_path, monkeypatch):
    """Its check and its dataset share the one parse (before: Streaming's parse and our check's)."""
    import rwkvclip_dist.data.index_check as index_check
    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader

    write_shards(str(tmp_path / "a"), 24, size_limit=1 << 12)
    write_shards(str(tmp_path / "b"), 8)
    reads = []
    original = index_check.read_shards
    monkeypatch.setattr(index_check, "read_shards",
                        lambda index, *rest: (reads.append(str(index)), original(index, *rest))[1])
    cfg = DataConfig(streams=[StreamConfig(remote=str(tmp_path / "a")), StreamConfig(remote=str(tmp_path / "b"))],
                     batch_size=4, num_workers=0)
    _, dataset = build_train_dataloader(cfg, 16, seed=0)
    assert sorted(reads) == [str(tmp_path / "a" / "index.json"), str(tmp_path / "b" / "index.json")]
    assert dataset.num_shards > 2 and dataset.num_samples == 32


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """1,000 stream directories sharing one real shard (hard links), each with its own index.json."""
    root = tmp_path_factory.mktemp("streams")
    write_shards(str(root / "real"), 8)
    index = json.loads((root / "real" / "index.json").read_text())
    dirs = []
    for s in range(1000):
        stream = root / f"stream_{s:04d}"
        stream.mkdir()
        for name in os.listdir(root / "real"):
            if name != "index.json":
                os.link(root / "real" / name, stream / name)
        (stream / "index.json").write_text(json.dumps(index))
        dirs.append(stream)
    return dirs


def test_a_damaged_index_among_a_thousand_streams_is_named(streams, tmp_path):
    check_local_indexes_once_per_node(streams)  # all fine: no error
    damaged = tmp_path / "stream_damaged"
    shutil.copytree(streams[537], damaged)
    text = (damaged / "index.json").read_text()
    (damaged / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ShardIndexError, match=r"stream_damaged/index\.json: not valid JSON"):
        check_local_indexes_once_per_node([*streams[:537], damaged, *streams[538:]])


def test_a_missing_index_among_a_thousand_streams_is_named(streams, tmp_path):
    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader

    missing = tmp_path / "stream_without_index"
    shutil.copytree(streams[0], missing)
    (missing / "index.json").unlink()
    configs = [StreamConfig(remote=str(p)) for p in [*streams[:999], missing]]
    cfg = DataConfig(streams=configs, batch_size=4, num_workers=0)
    with pytest.raises(FileNotFoundError, match="stream_without_index.*no index.json"):
        build_train_dataloader(cfg, 16, seed=0)


def _rank(rank: int, port: int, good: str, bad: str, out: str) -> None:
    import rwkvclip_dist.data.index_check as index_check

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    original = index_check.check_local_index
    index_check.check_local_index = lambda d, *rest: (calls.append(str(d)), original(d, *rest))[1]
    check_local_indexes_once_per_node([good])
    try:
        check_local_indexes_once_per_node([good, bad])
        outcome = "no error"
    except ShardIndexError as err:
        outcome = str(err)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"calls": calls, "outcome": outcome}, handle)
    dist.destroy_process_group()


def test_the_index_check_reads_once_per_node_and_every_rank_gets_its_verdict(streams, tmp_path):
    """Two gloo ranks of one node: local rank 0 reads the indexes; rank 1 reads none and raises the
    same error, naming the damaged stream."""
    bad = tmp_path / "bad"
    shutil.copytree(streams[1], bad)
    (bad / "index.json").write_text("{")
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    try:
        tmp.start_processes(_rank, args=(free_port(), str(streams[0]), str(bad), str(tmp_path)), nprocs=2,
                            start_method="spawn")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["calls"] == [str(streams[0]), str(streams[0]), str(bad)] and ranks[1]["calls"] == []
    assert ranks[0]["outcome"] == ranks[1]["outcome"]
    assert f"{bad}/index.json: not valid JSON" in ranks[1]["outcome"]
