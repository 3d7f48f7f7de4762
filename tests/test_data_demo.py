"""The embedded demo data set (scikit-learn digits): built once, deterministic, stratified, labelled."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import pytest
from streaming import StreamingDataset

from rwkvclip_dist.data.shards.demo_digits import CLASSNAMES, build_demo_data, ensure_demo_data
from rwkvclip_dist.eval.datasets import MDSLabelledImages
from rwkvclip_dist.data.shm import clean_stale_shm


def digest(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "digits"))


def test_idempotent_and_deterministic(demo, tmp_path):
    before = digest(demo)
    mtime = os.path.getmtime(os.path.join(demo, "zeroshot.json"))
    assert ensure_demo_data(demo) == demo
    assert os.path.getmtime(os.path.join(demo, "zeroshot.json")) == mtime, "rebuilt an existing set"
    assert digest(build_demo_data(str(tmp_path / "again"))) == before
    assert not [p for p in os.listdir(os.path.dirname(demo)) if p.startswith(".demo-digits-")]


def test_refuses_a_half_written_directory(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="zeroshot.json"):
        ensure_demo_data(str(tmp_path / "half"))


def test_splits_texts_and_zeroshot_file(demo):
    clean_stale_shm()
    rows = {}
    for split in ("train", "heldout"):
        ds = StreamingDataset(local=os.path.join(demo, split), shuffle=False, batch_size=1)
        rows[split] = [ds[i] for i in range(len(ds))]
        del ds
    clean_stale_shm()
    train, held = rows["train"], rows["heldout"]
    assert len(train) + len(held) == 1797
    assert not {r["key"] for r in train} & {r["key"] for r in held}
    held_counts, all_counts = Counter(r["label"] for r in held), Counter(r["label"] for r in train + held)
    for c in range(10):  # stratified: every class is held out at 20% (+-1 sample)
        assert abs(held_counts[c] - 0.2 * all_counts[c]) <= 1
    for r in train[:50] + held[:50]:
        name = CLASSNAMES[r["label"]]
        assert r["raw"] == str(r["label"])
        assert name in r["synthetic"] and name in r["generated"]
        assert len(r["generated"]) > len(r["synthetic"]) > len(r["raw"])
    assert len({r["generated"] for r in train}) > 100, "generated descriptions do not vary"
    with open(os.path.join(demo, "zeroshot.json")) as f:
        zs = json.load(f)
    assert zs["classnames"] == CLASSNAMES and all("{}" in t for t in zs["templates"])


def test_the_evaluation_reader_returns_the_labels(demo):
    heldout = MDSLabelledImages(os.path.join(demo, "heldout"), transform=lambda image: image.size)
    labels = []
    for size, label in heldout:
        assert size == (32, 32)
        labels.append(label)
    clean_stale_shm()
    ds = StreamingDataset(local=os.path.join(demo, "heldout"), shuffle=False, batch_size=1)
    assert labels == [ds[i]["label"] for i in range(len(ds))]  # in shard order, nothing dropped
    assert len(labels) == 360
    del ds
    clean_stale_shm()
