"""Descriptions generated from MDS shards merge back into shards through make_shards --captions.

Round trip: a CSV corpus -> tools/make_shards.py -> MDS (zstd, merged index) -> descriptions generated
against a real HTTP chat-completions server on 127.0.0.1 (tests/chat_server.py; a stand-in for
vLLM, which cannot run here) -> make_shards --captions -> read back with stock StreamingDataset.
"""

from __future__ import annotations

from chat_server import ChatServer

from conftest import caption_corpus, make_shards
from rwkvclip_dist.descriptions.bookkeeping import RunConfig
from rwkvclip_dist.descriptions.client import ClientConfig
from rwkvclip_dist.descriptions.runner import run_online
from rwkvclip_dist.descriptions.sources import iter_samples


def test_descriptions_from_mds_merge_into_shards(tmp_path):
    from streaming import StreamingDataset

    csv = caption_corpus(tmp_path, 9)
    assert make_shards(["--input", str(csv), "--out", str(tmp_path / "plain"), "--workers", "1"]) == 0
    samples = {s.key: s for s in iter_samples(tmp_path / "plain")}
    assert samples["m01"].synthetic == "two brown dogs running on a beach" and samples["m01"].tags == ("dog", "beach")

    srv = ChatServer().start()
    try:
        srv.faults = {"m04": ["empty", "empty"]}  # one sample without a description after the run
        cfg = RunConfig(input=tmp_path / "plain", out=tmp_path / "desc.jsonl", progress=False)
        stats = run_online(cfg, ClientConfig(base_url=srv.url, model="test-model", concurrency=4))
    finally:
        srv.stop()
    assert stats.done == 8 and stats.failed["empty"] == 1

    argv = ["--input", str(csv), "--out", str(tmp_path / "merged"), "--workers", "1", "--captions", str(cfg.out)]
    assert make_shards(argv) == 0
    dataset = StreamingDataset(local=str(tmp_path / "merged"), shuffle=False, batch_size=1)
    merged = {row["key"]: row for row in dataset}
    assert sorted(merged) == sorted(samples)
    assert merged["m00"]["generated"] == "A photo of a red car parked on a street."
    assert merged["m04"]["generated"] == ""
    assert merged["m02"]["synthetic"] == "a woman holding an umbrella", "merging must keep the other texts"
