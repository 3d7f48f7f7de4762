"""Streaming loader on real MDS shards: rank partition, exact mid-epoch resume, text weights, streams.

Multi-rank tests run two real torch.distributed gloo ranks with Streaming's environment variables.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from scipy.stats import chisquare

from conftest import RANK_ENV, text_index, write_shards
from rwkvclip_dist.data.columns import TEXT_ID
from rwkvclip_dist.data.config import DataConfig, StreamConfig
from rwkvclip_dist.data.loader import build_train_dataloader
from rwkvclip_dist.parallel.launch_env import free_port
from rwkvclip_dist.data.shm import clean_stale_shm
from rwkvclip_dist.typed_config import ConfigError, build_dataclass

pytestmark = pytest.mark.usefixtures("clean_shm_before_and_after")
N_RANK_SAMPLES = 96


def _epoch(loader, lookup, stop_after=None):
    """[(sample ids, text kinds, image bytes)] per batch; optionally the state after ``stop_after``."""
    batches, state = [], None
    for b, (img, tok, tid) in enumerate(loader):
        ids = [lookup[tuple(t.tolist())] for t in tok]
        assert [TEXT_ID[k] for _, k in ids] == tid.tolist()
        batches.append(([i for i, _ in ids], [k for _, k in ids], img.numpy().tobytes()))
        if stop_after is not None and b + 1 == stop_after:
            state = loader.state_dict()
            break
    return batches, state


def _rank_main(rank: int, world: int, port: int, data: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clean_stale_shm()  # this rank's unused segments only; nobody creates any before the barrier
        dist.barrier()
        cfg = DataConfig(streams=[StreamConfig(remote=data)], batch_size=4, num_workers=2,
                         shuffle=True, shuffle_seed=3, shuffle_block_size=32)
        lookup = text_index("s", N_RANK_SAMPLES)

        def run(stop_after=None, state=None):
            loader, dataset = build_train_dataloader(cfg, image_size=8, seed=11)
            if state is not None:
                loader.load_state_dict(state)
            out = _epoch(loader, lookup, stop_after)
            del loader, dataset
            dist.barrier()
            return out

        full, _ = run()
        _, state = run(stop_after=5)
        rest, _ = run(state=state)
        states = [None] * world
        dist.all_gather_object(states, state)
        seen = [None] * world
        dist.all_gather_object(seen, sorted(i for ids, _, _ in full for i in ids))
        torch.save({"full": full, "rest": rest, "states": states, "seen": seen},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_partition_and_exact_resume(tmp_path):
    data = str(tmp_path / "data")
    write_shards(data, N_RANK_SAMPLES)
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    try:
        # fork, as under torchrun: a spawned rank would also spawn its DataLoader workers, each
        # re-importing torch (tens of seconds on two shared cores) for no extra coverage.
        tmp.start_processes(_rank_main, args=(2, free_port(), data, str(tmp_path)), nprocs=2,
                            join=True, start_method="fork")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    seen0, seen1 = r0["seen"]
    assert not set(seen0) & set(seen1), "ranks read overlapping samples"
    assert sorted(seen0 + seen1) == list(range(N_RANK_SAMPLES)), "ranks do not cover the epoch"
    assert r0["states"][0] == r0["states"][1] and r0["states"][0]["sample_in_epoch"] == 5 * 4 * 2
    for r in (r0, r1):
        assert len(r["full"]) == N_RANK_SAMPLES // 8
        # Same samples, same text choice, bit-identical augmented images after the resume.
        assert r["rest"] == r["full"][5:]


def test_text_choice_matches_weights_and_skips_missing(tmp_path):
    data = str(tmp_path / "data")
    n = 400
    write_shards(data, n, synthetic_every=4)  # 100 rows have all three texts, 300 lack synthetic
    weights = {"raw": 1.0, "synthetic": 2.0, "generated": 5.0}
    cfg = DataConfig(streams=[StreamConfig(remote=data)], batch_size=50, num_workers=0,
                     text_weights=weights)
    loader, _ = build_train_dataloader(cfg, image_size=8, seed=0)
    lookup = text_index("s", n)
    full = {k: 0 for k in weights}
    partial = {k: 0 for k in weights}
    for _ in range(3):  # three epochs: fresh draws per epoch, 1200 choices in all
        for ids, kinds, _ in _epoch(loader, lookup)[0]:
            for i, k in zip(ids, kinds):
                (full if i % 4 == 0 else partial)[k] += 1
    assert partial["synthetic"] == 0, "a missing text was picked"
    total = sum(weights.values())
    obs = [full[k] for k in weights]
    exp = [sum(obs) * w / total for w in weights.values()]
    # Seeded draws, so this is deterministic; a wrong weighting gives p far below 1e-3.
    assert chisquare(obs, exp).pvalue > 1e-3, (obs, exp)
    obs2 = [partial["raw"], partial["generated"]]
    assert chisquare(obs2, [sum(obs2) / 6, sum(obs2) * 5 / 6]).pvalue > 1e-3, obs2


def test_weighted_streams_with_remote_and_local_cache(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_shards(a, 40, prefix="a")
    write_shards(b, 40, prefix="b")
    cfg = DataConfig(streams=[StreamConfig(remote=a, local=str(tmp_path / "cache_a"), proportion=3),
                              StreamConfig(remote=b, proportion=1)],
                     batch_size=8, num_workers=0, epoch_size=64, text_weights={"raw": 1.0})
    loader, _ = build_train_dataloader(cfg, image_size=8, seed=0)
    lookup = {**{k: ("a",) + v for k, v in text_index("a", 40).items()},
              **{k: ("b",) + v for k, v in text_index("b", 40).items()}}
    got = [lookup[tuple(t.tolist())][0] for _, tok, _ in loader for t in tok]
    assert (got.count("a"), got.count("b")) == (48, 16)
    assert os.path.isfile(tmp_path / "cache_a" / "index.json"), "remote stream was not cached locally"


def test_corrupt_sample_is_replaced_marked_and_counted(tmp_path):
    data = str(tmp_path / "data")
    write_shards(data, 10, corrupt={0, 5})
    cfg = DataConfig(streams=[StreamConfig(remote=data)], batch_size=10, shuffle=False,
                     text_weights={"raw": 1.0, "synthetic": 0.0, "generated": 0.0})
    loader, dataset = build_train_dataloader(cfg, image_size=8, seed=0)
    (img, tok, tid), = list(loader)
    lookup = text_index("s", 10)
    ids = [lookup[tuple(t.tolist())][0] for t in tok]
    assert ids == [1, 1, 2, 3, 4, 4, 6, 7, 8, 9]
    assert dataset.num_corrupt == 2
    # The copies keep the batch shape but are marked, so the trainer leaves them out of the loss.
    assert torch.equal(img[0], img[1]) and tid.tolist() == [0, -1, 0, 0, 0, -1, 0, 0, 0, 0]


def _add_to_counter(dataset, times: int, start) -> None:
    start.wait()  # all at once: the increments overlap
    for _ in range(times):
        dataset.corrupt_counter.add()


def test_corrupt_counts_of_several_worker_processes_are_all_kept(tmp_path):
    """The node's corrupt-sample counter is incremented by every loader worker: three workers over
    shards where every other sample is undecodable count each one, and four processes incrementing at
    once (a read-modify-write without a lock loses counts there) lose none."""
    data = str(tmp_path / "data")
    write_shards(data, 48, corrupt=set(range(1, 48, 2)), size_limit=1 << 11)
    cfg = DataConfig(streams=[StreamConfig(remote=data)], batch_size=4, num_workers=3, shuffle=False)
    loader, dataset = build_train_dataloader(cfg, image_size=8, seed=0)
    assert sum(len(tid) for _, _, tid in loader) == 48
    assert dataset.num_corrupt == 24
    context = tmp.get_context("fork")
    start = context.Barrier(4)
    procs = [context.Process(target=_add_to_counter, args=(dataset, 20000, start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 4
    assert dataset.num_corrupt == 24 + 4 * 20000


def test_config_and_stream_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="text_weights.*caption"):
        DataConfig(text_weights={"caption": 1.0})
    with pytest.raises(ValueError, match="at least one weight"):
        DataConfig(text_weights={"raw": 0.0})
    # recipes build DataConfig through the one typed loader, which names an unknown key and its file
    with pytest.raises(ConfigError, match="data.batchsize.*unknown key 'batchsize'"):
        build_dataclass(DataConfig, {"batchsize": 4}, {}, "recipe r.yaml", "data.")
    data = {"streams": [{"remote": str(tmp_path), "proportion": 1}], "batch_size": 2}
    with pytest.raises(ConfigError, match=rf"recipe r.yaml: data.streams\[0\].remote: {tmp_path} has no index.json"):
        build_dataclass(DataConfig, data, {}, "recipe r.yaml", "data.")
    cfg = build_dataclass(DataConfig, data, {}, "recipe r.yaml", "data.", check_paths=False)
    assert cfg.streams[0] == StreamConfig(remote=str(tmp_path), proportion=1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no index.json"):  # the loader checks again
        build_train_dataloader(cfg, image_size=8, seed=0)


def test_choose_text_edges():
    from rwkvclip_dist.data.dataset import choose_text
    texts = {"raw": "r", "synthetic": "", "generated": "g"}
    assert choose_text(texts, {"raw": 0.0, "synthetic": 1.0, "generated": 0.0}, 0.99) in ("raw", "generated")
    assert choose_text(texts, {"raw": 1.0, "generated": 3.0}, 0.2) == "raw"
    assert choose_text(texts, {"raw": 1.0, "generated": 3.0}, 0.3) == "generated"
    assert choose_text(texts, {"raw": 1.0, "generated": 0.0}, 0.999999999) == "raw"
    with pytest.raises(ValueError, match="no text"):
        choose_text({"raw": ""}, {"raw": 1.0}, 0.5)


@pytest.mark.parametrize("cache_limit", [None, "1gb"])
def test_prefetch_checks_a_local_shard_once_without_a_cache_limit(tmp_path, monkeypatch, cache_limit):
    """Streaming's prefetch thread re-checks the shard of every sample under a file lock; without a
    cache limit (nothing can be evicted) ours stops checking a shard once this process has seen it
    local, with one it keeps Streaming's per-sample check. Counted over a second epoch, when every
    shard is local; both epochs are complete."""
    from streaming import StreamingDataset

    write_shards(str(tmp_path / "data"), 48)
    calls = []
    stock = StreamingDataset.prepare_shard

    def counting(self, shard_id, blocking=True):
        calls.append(shard_id)
        return stock(self, shard_id, blocking)

    monkeypatch.setattr(StreamingDataset, "prepare_shard", counting)
    cfg = DataConfig(streams=[StreamConfig(remote=str(tmp_path / "data"), local=str(tmp_path / "cache"))],
                     batch_size=4, num_workers=0, shuffle=False, cache_limit=cache_limit)
    loader, dataset = build_train_dataloader(cfg, image_size=8, seed=0)
    lookup = text_index("s", 48)
    for epoch in range(2):
        calls.clear()
        batches, _ = _epoch(loader, lookup)
        assert sorted(i for ids, _, _ in batches for i in ids) == list(range(48)), f"epoch {epoch}"
    assert dataset.num_shards > 1
    if cache_limit is None:
        assert calls == []
    else:  # about once per sample (the prefetch thread may stop a few short when the epoch ends)
        assert len(calls) > 48 // 2


def _open_at_once(data: str, start, registered, results) -> None:
    """A one-rank job (its own process) that opens the dataset when ``start`` fires, with Streaming's
    scan for a free shared-memory prefix slowed: the window between the scan and the creation of the
    prefix, where two jobs collide, is otherwise a few microseconds."""
    import streaming.base.shared.prefix as prefix

    scan = prefix._check_and_find

    def slow_scan(*args, **kwargs):
        found = scan(*args, **kwargs)
        time.sleep(0.3)
        return found

    prefix._check_and_find = slow_scan
    start.wait()
    try:
        _, dataset = build_train_dataloader(DataConfig(streams=[StreamConfig(remote=data)], batch_size=4,
                                                       num_workers=0), image_size=8, seed=0)
        results.put(dataset._shm_prefix_int)
    except Exception as err:  # noqa: BLE001 - the parent reports it
        results.put(f"{type(err).__name__}: {err}")
    registered.wait(60)  # keep the prefix registered until every job has one


def test_jobs_starting_together_get_their_own_shared_memory_prefix(tmp_path):
    """Two jobs on one node that open their datasets at the same instant (two test workers, two runs)
    must not collide on Streaming's shared-memory prefix (``[Errno 17] File exists: '/000000_locals'``
    before the node lock in data/streaming_compat.py)."""
    write_shards(str(tmp_path / "data"), 16)
    context = mp.get_context("fork")
    start, registered, results = context.Event(), context.Event(), context.Queue()
    jobs = [context.Process(target=_open_at_once, args=(str(tmp_path / "data"), start, registered, results))
            for _ in range(3)]
    for job in jobs:
        job.start()
    start.set()
    try:
        got = [results.get(timeout=120) for _ in jobs]
    finally:
        registered.set()
        for job in jobs:
            job.join(30)
    assert all(isinstance(g, int) for g in got), got
    assert len(set(got)) == len(jobs), got


def _open_while_an_unlocked_job_registers(data: str, results) -> None:
    """One job whose prefix is taken, between its scan and its creation, by a registrant that does not
    take the node lock (stock ``StreamingDataset``: a test reading shards the stock way, another user's
    job): the scan is wrapped to create the found prefix's ``_locals`` the first time, as such a job would."""
    import streaming.base.shared.prefix as prefix
    from streaming.base.shared import SharedMemory

    scan, taken = prefix._check_and_find, []

    def scan_then_lose_the_race(streams_local, streams_remote, shm_name):
        found = scan(streams_local, streams_remote, shm_name)
        if not taken and shm_name == "locals":
            taken.append((found, SharedMemory(prefix._get_path(found, "locals"), True, 64)))
        return found

    prefix._check_and_find = scan_then_lose_the_race
    try:
        _, dataset = build_train_dataloader(DataConfig(streams=[StreamConfig(remote=data)], batch_size=4,
                                                       num_workers=0), image_size=8, seed=0)
        results.put((taken[0][0], dataset._shm_prefix_int))
    except Exception as err:  # noqa: BLE001 - the parent reports it
        results.put(f"{type(err).__name__}: {err}")
    finally:
        for _, shm in taken:
            shm.cleanup()


def test_a_prefix_taken_by_a_job_outside_the_lock_is_not_fatal(tmp_path):
    """The node lock orders the project's own registrations only; a registrant outside it that takes the
    prefix between the leader's scan and creation made the job fail with ``[Errno 17] File exists:
    '/NNNNNN_locals'`` (seen once with two test workers). The leader scans again instead."""
    write_shards(str(tmp_path / "data"), 16)
    context = mp.get_context("fork")
    results = context.Queue()
    job = context.Process(target=_open_while_an_unlocked_job_registers, args=(str(tmp_path / "data"), results))
    job.start()
    got = results.get(timeout=120)
    job.join(30)
    assert isinstance(got, tuple), got
    theirs, mine = got
    assert mine != theirs, got


def _rank_with_a_failing_leader(rank: int, port: int, data: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import streaming.base.shared.prefix as prefix

    def reused(*args, **kwargs):
        raise ValueError("Reused local directory: stand-in for another job's")

    prefix._check_and_find_retrying = reused  # only the local leader scans
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        build_train_dataloader(DataConfig(streams=[StreamConfig(remote=data)], batch_size=4, num_workers=0),
                               image_size=8, seed=0)
        results.put((rank, "opened"))
    except Exception as err:  # noqa: BLE001 - the parent checks it
        results.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


def test_a_leader_that_cannot_register_stops_its_nodes_ranks(tmp_path):
    """The local leader registers the node's prefix alone (under the lock); its failure must reach the
    other ranks of the node at once, not leave them in the collective until its timeout."""
    write_shards(str(tmp_path / "data"), 16)
    context = mp.get_context("fork")
    results, port = context.Queue(), free_port()
    ranks = [context.Process(target=_rank_with_a_failing_leader, args=(r, port, str(tmp_path / "data"), results))
             for r in range(2)]
    for rank in ranks:
        rank.start()
    got = dict(results.get(timeout=45) for _ in ranks)
    for rank in ranks:
        rank.join(30)
    assert got[0].startswith("ValueError: Reused local directory"), got
    assert got[1].startswith("RuntimeError: the node's local leader could not register"), got
