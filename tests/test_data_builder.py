"""Shard builder round trips: every input kind, bad samples counted by reason, resume, CLI exit codes.

The output is read back with the stock ``streaming.StreamingDataset`` only (no project code), which is
the contract other tools rely on.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pandas as pd
import pytest
from PIL import Image

from conftest import add, jpeg, make_shards, read_back
from rwkvclip_dist.data.shards.builder import REJECTS, BuildOptions, build_shards


@pytest.fixture
def bad_tar(tmp_path):
    """img2dataset-style tar: 5 good samples and one of each bad kind."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as t:
        for i in range(5):
            add(t, f"good{i}.jpg", jpeg(i))
            add(t, f"good{i}.txt", f"caption {i}".encode())
            add(t, f"good{i}.json", json.dumps({"url": f"http://x/{i}.jpg", "tags": ["t"]}).encode())
        add(t, "png0.png", jpeg(9, fmt="PNG"))  # good, re-encoded to JPEG
        add(t, "png0.txt", b"a png")
        add(t, "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        add(t, "corrupt.txt", b"broken image")
        add(t, "trunc.jpg", jpeg(7, size=(64, 64))[:300])
        add(t, "trunc.txt", b"truncated image")
        add(t, "empty.jpg", jpeg(10))
        add(t, "empty.txt", b"   \n")
        add(t, "latin.jpg", jpeg(11))
        add(t, "latin.txt", "caf\u00e9".encode("latin-1"))
        add(t, "notext.jpg", jpeg(12))
        add(t, "good0.jpg", jpeg(13))  # the duplicate key, seen again later in the tar
        add(t, "good0.txt", b"duplicate")
    return path


def test_tar_round_trip_counts_bad_samples(bad_tar, tmp_path):
    out = str(tmp_path / "out")
    report = build_shards(BuildOptions(inputs=[str(bad_tar)], out=out))
    assert report["written"] == 6
    assert {k: v for k, v in report["rejected"].items() if v} == {
        "corrupt_image": 2, "empty_text": 1, "non_utf8_text": 1, "missing_text": 1, "duplicate_key": 1}
    rows = read_back(out)
    assert sorted(rows) == ["good0", "good1", "good2", "good3", "good4", "png0"]
    assert rows["good0"]["raw"] == "caption 0"  # the first occurrence wins
    assert rows["good3"]["tags"] == ["t"] and rows["good3"]["source"] == "http://x/3.jpg"
    assert rows["good2"]["jpg"] == jpeg(2)  # a valid RGB JPEG is stored byte for byte
    assert Image.open(io.BytesIO(rows["png0"]["jpg"])).format == "JPEG"
    with open(os.path.join(out, REJECTS)) as f:
        rejects = [json.loads(line) for line in f]
    assert {(r["key"], r["reason"]) for r in rejects} >= {("latin", "non_utf8_text"),
                                                          ("trunc", "corrupt_image")}
    assert all(r["input"] == str(bad_tar) for r in rejects)


def test_table_inputs_and_caption_merge(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(3):
        (img_dir / f"{i}.jpg").write_bytes(jpeg(i))
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"key": ["c0", "c1", "c2", "c3"], "image_path": ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg",
                  "imgs/missing.jpg"], "caption": ["zero", "one", "two", "three"]}).to_csv(csv, index=False)
    with open(csv, "ab") as f:  # a row whose caption is not UTF-8
        f.write(b"c4,imgs/0.jpg,caf\xe9\n")
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame({"key": ["p0", "p1"], "jpg": [jpeg(20), jpeg(21)], "raw": ["p zero", "p one"],
                  "synthetic": ["syn p0", ""], "tags": ['["a", "b"]', "[]"]}).to_parquet(parquet)
    caps1 = tmp_path / "caps1.jsonl"
    caps1.write_text('{"key": "c0", "synthetic": "old", "generated": "gen c0"}\n'
                     '{"key": "nowhere", "synthetic": "x"}\n')
    caps2 = tmp_path / "caps2.jsonl"
    caps2.write_text('{"key": "c0", "synthetic": "new", "tags": ["cat"]}\n')
    out = str(tmp_path / "out")
    report = build_shards(BuildOptions(inputs=[str(csv), str(parquet)], out=out,
                                       captions=[str(caps1), str(caps2)], workers=2))
    assert report["written"] == 5
    assert report["rejected"]["missing_file"] == 1 and report["rejected"]["non_utf8_text"] == 1
    assert report["unknown_caption_keys"] == 1 and report["unknown_caption_keys_sample"] == ["nowhere"]
    rows = read_back(out)
    assert sorted(rows) == ["c0", "c1", "c2", "p0", "p1"]
    assert (rows["c0"]["synthetic"], rows["c0"]["generated"], rows["c0"]["tags"]) == ("new", "gen c0", ["cat"])
    assert rows["p0"]["synthetic"] == "syn p0" and rows["p0"]["tags"] == ["a", "b"]
    assert rows["p1"]["synthetic"] == "" and rows["c1"]["raw"] == "one"


def test_image_folder_with_sidecars_and_resize(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(1, size=(100, 50)))
    (root / "a.txt").write_text("folder a")
    (root / "sub" / "b.png").write_bytes(jpeg(2, fmt="PNG"))
    (root / "sub" / "b.txt").write_text("folder b")
    (root / "sub" / "b.json").write_text('{"generated": "a long description", "tags": ["x"]}')
    (root / "c.jpg").write_bytes(jpeg(3))
    (root / "c.json").write_text("{not json")
    (root / "c.txt").write_text("c")
    out = str(tmp_path / "out")
    report = build_shards(BuildOptions(inputs=[str(root)], out=out, resize_max_side=40))
    assert report["written"] == 2 and report["rejected"]["bad_metadata"] == 1
    rows = read_back(out)
    assert rows["sub/b"]["generated"] == "a long description" and rows["sub/b"]["tags"] == ["x"]
    assert (rows["a"]["width"], rows["a"]["height"]) == (40, 20)
    assert Image.open(io.BytesIO(rows["a"]["jpg"])).size == (40, 20)


def test_cross_file_duplicates_and_resume(bad_tar, tmp_path):
    second = tmp_path / "00001.tar"
    with tarfile.open(second, "w") as t:
        for key in ("good1", "fresh"):  # good1 is already in 00000.tar
            add(t, f"{key}.jpg", jpeg(30))
            add(t, f"{key}.txt", b"from the second tar")
    out = str(tmp_path / "out")
    opts = BuildOptions(inputs=[str(tmp_path / "*.tar")], out=out, workers=2)
    first = build_shards(opts)
    assert first["written"] == 7 and first["rejected"]["duplicate_key"] == 2
    assert read_back(out)["good1"]["raw"] == "caption 1"
    # Simulate a build killed while writing the second unit: no done marker, a half-written part.
    os.remove(os.path.join(out, ".build", "tar-00001.tar.done"))
    with open(os.path.join(out, "tar-00001.tar", "shard.00000.mds.zstd"), "wb") as f:
        f.write(b"half a shard")
    again = build_shards(opts)
    assert again == first
    assert len(read_back(out)) == 7


def test_cli_exit_codes(tmp_path, capsys):
    empty = tmp_path / "bad.tar"
    with tarfile.open(empty, "w") as t:
        add(t, "x.jpg", b"garbage")
        add(t, "x.txt", b"text")
    assert make_shards(["--input", str(empty), "--out", str(tmp_path / "o1"), "--workers", "1"]) == 1
    assert "no usable sample" in capsys.readouterr().err
    assert make_shards(["--input", str(tmp_path / "nope.tar"), "--out", str(tmp_path / "o2")]) == 2
    assert "nope.tar" in capsys.readouterr().err


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as t:
        for i in range(6):
            add(t, f"k{i}.jpg", jpeg(i, size=(64, 64)))
            add(t, f"k{i}.txt", f"text {i}".encode())
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    report = build_shards(BuildOptions(inputs=[str(cut)], out=str(tmp_path / "out")))
    assert report["rejected"]["unreadable_input"] == 1
    rows = read_back(str(tmp_path / "out"))
    assert 2 <= len(rows) < 6 and sorted(rows) == [f"k{i}" for i in range(len(rows))]
