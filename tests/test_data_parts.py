"""Cluster builds (``make_shards.py --shard I/N`` then ``--merge``) against a one-part build, and the
out-of-core caption join against the plain dict merge it replaces.

Every output is read with the stock ``streaming.StreamingDataset`` only.
"""

from __future__ import annotations

import json
import os
import random
import tarfile

import pandas as pd
import pytest
from streaming import StreamingDataset

from conftest import add, jpeg, make_shards, read_back
from rwkvclip_dist.data.shards.builder import REJECTS, REPORT, BuildOptions, build_shards
from rwkvclip_dist.data.shards.captions import CaptionTable, index_captions
from rwkvclip_dist.data.shards.parts import part_name
from rwkvclip_dist.data.shm import clean_stale_shm


def _tar(path, keys, bad=()):
    with tarfile.open(path, "w") as t:
        for i, key in enumerate(keys):
            add(t, f"{key}.jpg", b"not a jpeg" if key in bad else jpeg(hash(key) % 1000 + i))
            add(t, f"{key}.txt", f"text of {key} in {os.path.basename(path)}".encode())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Five tars, a CSV and a folder (7 units; with N=3 parts: units 0,3,6 / 1,4 / 2,5). Duplicate
    keys within a tar, within part 0 (tar 0 and tar 3) and across parts (tar 0 and tar 1, tar 2 and
    the CSV); bad images; captions in two files with overrides and keys no input has."""
    root = tmp_path_factory.mktemp("inputs")
    _tar(root / "t0.tar", ["a0", "a1", "a2", "dup01", "dup03", "a0"], bad={"a2"})
    _tar(root / "t1.tar", ["b0", "dup01", "b1"])
    _tar(root / "t2.tar", ["c0", "c1", "dup2csv"], bad={"c1"})
    _tar(root / "t3.tar", ["d0", "dup03"])
    _tar(root / "t4.tar", ["e0", "e1", "e2", "e3"])
    (root / "imgs").mkdir()
    for i in range(3):
        (root / "imgs" / f"{i}.jpg").write_bytes(jpeg(50 + i))
    pd.DataFrame({"key": ["f0", "dup2csv", "f1"], "image_path": ["imgs/0.jpg", "imgs/1.jpg", "imgs/gone.jpg"],
                  "caption": ["f zero", "f dup", "f one"]}).to_csv(root / "t5.csv", index=False)
    (root / "folder").mkdir()
    for name in ("g0", "g1"):
        (root / "folder" / f"{name}.jpg").write_bytes(jpeg(len(name) + 60))
        (root / "folder" / f"{name}.txt").write_text(f"folder {name}")
    (root / "caps1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"key": "a0", "synthetic": "old a0", "tags": ["x"]}, {"key": "b1", "generated": "gen b1"},
        {"key": "nowhere1", "synthetic": "?"}, {"key": "e2", "synthetic": "syn e2"}]))
    (root / "caps2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"key": "a0", "synthetic": "new a0"}, {"key": "nowhere0", "tags": []}, {"key": "g1", "generated": "g"}]))
    return root


def _args(root, out):
    args = ["--out", str(out), "--captions", str(root / "caps1.jsonl"), "--captions", str(root / "caps2.jsonl")]
    for name in ("t0.tar", "t1.tar", "t2.tar", "t3.tar", "t4.tar", "t5.csv", "folder"):
        args += ["--input", str(root / name)]
    return args


def _rejects(out):
    with open(os.path.join(out, REJECTS)) as f:
        return [json.loads(line) for line in f]


def _report(out):
    with open(os.path.join(out, REPORT)) as f:
        return json.load(f)


def test_parts_and_merge_equal_a_one_part_build(inputs, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    assert make_shards(_args(inputs, one) + ["--workers", "1"]) == 0
    expected = read_back(str(one))
    assert sorted(expected) == ["a0", "a1", "b0", "b1", "c0", "d0", "dup01", "dup03", "dup2csv", "e0", "e1",
                                "e2", "e3", "f0", "g0", "g1"]
    assert expected["dup01"]["raw"].endswith("t0.tar") and expected["dup2csv"]["raw"].endswith("t2.tar")
    assert (expected["a0"]["synthetic"], expected["a0"]["tags"]) == ("new a0", ["x"])

    assert make_shards(_args(inputs, many) + ["--prepare"]) == 0
    for i in (2, 0, 1):  # any order, one with a worker pool
        assert make_shards(_args(inputs, many) + ["--shard", f"{i}/3", "--workers", str(1 + (i == 1))]) == 0
    assert make_shards(["--merge", "--out", str(many), "--workers", "1"]) == 0
    assert read_back(str(many)) == expected  # keys, image bytes and every column
    assert _report(many) == _report(one)
    report = _report(one)
    assert report["rejected"]["duplicate_key"] == 4 and report["rejected"]["corrupt_image"] == 2
    assert report["unknown_caption_keys"] == 2 and report["unknown_caption_keys_sample"] == ["nowhere0", "nowhere1"]
    assert _rejects(many) == _rejects(one)
    assert json.loads((many / "index.json").read_text())["shards"][0]["raw_data"]["basename"].startswith(
        f"{part_name(0, 3)}/tar-t0.tar/")

    # remote=OUT: Streaming copies every part's shards into its own cache, sub-folders included.
    clean_stale_shm()
    ds = StreamingDataset(remote=str(many), local=str(tmp_path / "cache"), shuffle=False, batch_size=1)
    assert sorted(ds[i]["key"] for i in range(len(ds))) == sorted(expected)
    del ds
    clean_stale_shm()


def test_interrupted_part_reruns_alone_and_resumes(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        assert make_shards(_args(inputs, out) + ["--shard", f"{i}/3", "--workers", "1"]) == 0
    part0 = out / part_name(0, 3)
    kept = part0 / ".build" / "tar-t0.tar.done"
    kept_mtime = kept.stat().st_mtime_ns
    # Part 0 killed while writing its second unit: no done marker, a half-written shard, no part.json.
    (part0 / ".build" / "tar-t3.tar.done").unlink()
    (part0 / "part.json").unlink()
    (part0 / "tar-t3.tar" / "shard.00000.mds.zstd").write_bytes(b"half a shard")
    assert make_shards(["--merge", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "part(s) 0 of 3" in err and "--array=0" in err
    assert make_shards(_args(inputs, out) + ["--shard", "0/3", "--workers", "1"]) == 0
    assert kept.stat().st_mtime_ns == kept_mtime, "a finished unit was rebuilt"
    assert make_shards(_args(inputs, out) + ["--merge", "--workers", "1"]) == 0
    assert sorted(read_back(str(out))) == ["a0", "a1", "b0", "b1", "c0", "d0", "dup01", "dup03", "dup2csv",
                                           "e0", "e1", "e2", "e3", "f0", "g0", "g1"]
    # The merge checks the parts against the arguments it is given.
    assert make_shards(_args(inputs, out)[:-2] + ["--merge"]) == 2
    assert "other files" in capsys.readouterr().err
    assert make_shards(["--out", str(out), "--shard", "3/3", "--input", str(inputs / "t0.tar")]) == 2


def test_caption_table_matches_the_dict_merge(tmp_path):
    """Random caption files (repeated keys, partial lines, explicit nulls, unicode) merge exactly as the
    in-memory rule: per field, the last line that gives it wins."""
    rng = random.Random(0)
    keys = [f"k{i}\u00e9" for i in range(300)]
    files, expected = [], {}
    for n in range(3):
        path = tmp_path / f"c{n}.jsonl"
        lines = []
        for _ in range(400):
            key = rng.choice(keys)
            obj = {"key": key}
            for field in ("synthetic", "generated", "tags"):
                if rng.random() < 0.5:
                    obj[field] = None if rng.random() < 0.1 else (
                        [f"t{rng.randrange(9)}"] if field == "tags" else f"{field} {rng.random():.6f}")
            obj["ignored"] = 1
            lines.append(json.dumps(obj))
            expected.setdefault(key, {}).update({k: v for k, v in obj.items() if k in ("synthetic", "generated", "tags")})
        path.write_text("\n".join(lines) + "\n\n")
        files.append(str(path))
    table = CaptionTable(index_captions(files, str(tmp_path / "caps.sqlite")))
    assert len(table) == len(expected)
    assert all(table.get(k) == v for k, v in expected.items())
    assert table.get("absent") is None
    hits = tmp_path / "hits"
    present = sorted(expected)
    hits.write_text("".join(json.dumps(k) + "\n" for k in present[5:] + present[5:9]))
    assert table.unknown([str(hits)], str(tmp_path / "scratch.sqlite"), sample=3) == (5, present[:3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "x"}\n{"key": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each line needs a string 'key'"):
        index_captions([str(bad)], str(tmp_path / "bad.sqlite"))
    assert not os.path.exists(tmp_path / "bad.sqlite")


def test_captions_are_indexed_once_per_caption_set(inputs, tmp_path):
    out = tmp_path / "out"
    opts = BuildOptions(inputs=[str(inputs / "t4.tar")], out=str(out), captions=[str(inputs / "caps1.jsonl")])
    assert build_shards(opts)["written"] == 4
    db = list((out / ".build").glob("captions-*.sqlite"))
    assert len(db) == 1
    mtime = db[0].stat().st_mtime_ns
    assert read_back(str(out))["e2"]["synthetic"] == "syn e2"
    build_shards(opts)
    assert db[0].stat().st_mtime_ns == mtime
