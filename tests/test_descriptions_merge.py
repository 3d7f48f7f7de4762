"""Descriptions generated from MDS shards merge back into shards through make_shards --captions.

Round trip: a CSV corpus -> tools/make_shards.py -> MDS (zstd, merged index) -> descriptions generated
against a real HTTP chat-completions server on 127.0.0.1 (test_descriptions_server.py; a stand-in for
vLLM, which cannot run here) -> make_shards --captions -> read back with stock StreamingDataset.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image
from test_descriptions_server import ChatServer

from rwkvclip_dist.descriptions.bookkeeping import RunConfig
from rwkvclip_dist.descriptions.client import ClientConfig
from rwkvclip_dist.descriptions.runner import run_online
from rwkvclip_dist.descriptions.sources import iter_samples

MAKE_SHARDS = Path(__file__).resolve().parents[1] / "tools" / "make_shards.py"
CAPTIONS = [
    ("a red car parked on a street", ["car", "street"]),
    ("two brown dogs running on a beach", ["dog", "beach"]),
    ("a woman holding an umbrella", ["woman", "umbrella"]),
]


def _make_shards(argv: list[str]) -> int:
    if not MAKE_SHARDS.exists():
        pytest.skip("tools/make_shards.py (the data issue) is not in this tree yet")
    spec = importlib.util.spec_from_file_location("make_shards", MAKE_SHARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _corpus(root: Path, n: int) -> Path:
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (24, 24), (40 * i % 255, 90, 160)).save(root / "img" / f"{i}.jpg")
        caption, tags = CAPTIONS[i % len(CAPTIONS)]
        rows.append({"key": f"m{i:02d}", "image_path": f"img/{i}.jpg", "raw": f"holiday pic key=m{i:02d}",
                     "synthetic": caption, "tags": json.dumps(tags)})  # fmt: skip
    csv = root / "corpus.csv"
    import pandas as pd

    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_descriptions_from_mds_merge_into_shards(tmp_path):
    from streaming import StreamingDataset

    csv = _corpus(tmp_path, 9)
    assert _make_shards(["--input", str(csv), "--out", str(tmp_path / "plain"), "--workers", "1"]) == 0
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
    assert _make_shards(argv) == 0
    dataset = StreamingDataset(local=str(tmp_path / "merged"), shuffle=False, batch_size=1)
    merged = {row["key"]: row for row in dataset}
    assert sorted(merged) == sorted(samples)
    assert merged["m00"]["generated"] == "A photo of a red car parked on a street."
    assert merged["m04"]["generated"] == ""
    assert merged["m02"]["synthetic"] == "a woman holding an umbrella", "merging must keep the other texts"
