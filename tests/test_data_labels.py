"""Labelled evaluation sets: ``make_shards.py --labels folder|COLUMN [--classes FILE]`` writes a
``label`` column that ``tools/evaluate.py --task zeroshot`` reads; bad labels stop the build with the
file (and row) named."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from PIL import Image
from tool_loader import tool_main

from torchvision.datasets import ImageFolder

from conftest import jpeg, make_shards, read_back
from rwkvclip_dist.eval.datasets import open_labelled_images
from rwkvclip_dist.pretrained import create_model_and_transforms, load_model, save_pretrained

CLASSES = ("red", "green", "blue")  # folder order on disk differs from sorted order (blue, green, red)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet-style: one subfolder per class, JPEGs (stored byte for byte), no captions."""
    root = tmp_path_factory.mktemp("imagenet_like")
    gen = torch.Generator().manual_seed(0)
    for c, rgb in zip(CLASSES, ((220, 30, 30), (30, 200, 40), (30, 40, 220))):
        (root / c).mkdir()
        for i in range(4):
            noise = torch.randint(-20, 21, (32, 32, 3), generator=gen)
            pixels = (torch.tensor(rgb).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{c}_{i}.JPEG", format="JPEG", quality=95)
    return root


def test_folder_labels_and_zeroshot_on_the_shards(folder, tmp_path):
    out = tmp_path / "val"
    assert make_shards(["--input", str(folder), "--out", str(out), "--labels", "folder", "--workers", "1"]) == 0
    rows = read_back(str(out))
    assert len(rows) == 12
    assert {k: (r["label"], r["raw"]) for k, r in rows.items() if k.endswith("_0")} == {
        "blue/blue_0": (0, "blue"), "green/green_0": (1, "green"), "red/red_0": (2, "red")}

    torch.manual_seed(0)
    model = save_pretrained(load_model("tiny"), tmp_path / "tiny.safetensors")
    (tmp_path / "prompts.json").write_text(json.dumps({"templates": ["a {c} square."]}))
    (tmp_path / "names.txt").write_text("blue\ngreen\nred\n")
    evaluate = tool_main("evaluate")
    results = {}
    for name, data in (("mds", out), ("folder", folder)):
        path = tmp_path / f"{name}.json"
        assert evaluate(["--model", str(model), "--task", "zeroshot", "--data", str(data), "--templates",
                         str(tmp_path / "prompts.json"), "--classnames", str(tmp_path / "names.txt"),
                         "--workers", "0", "--output", str(path)]) == 0
        results[name] = json.loads(path.read_text())["results"]["zeroshot"]
    assert results["mds"]["n"] == 12
    for r in results.values():
        r.pop("seconds")
    assert results["mds"] == results["folder"]
    # What makes those equal: the evaluator reads the same pixels and labels from both.
    _, _, tf = create_model_and_transforms(None, pretrained=str(model))
    shards, _ = open_labelled_images(out, tf)
    images = ImageFolder(str(folder), transform=tf)
    from_folder = {os.path.splitext(os.path.relpath(p, folder))[0]: i for i, (p, _) in enumerate(images.samples)}
    for i in range(len(shards)):
        image, label, readable = shards[i]
        want_image, want_label = images[from_folder[shards.dataset.sample(i)["key"]]]
        assert readable == 1 and label == want_label and torch.equal(image, want_image)


def test_class_list_orders_labels_and_names_bad_folders(folder, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    assert make_shards(["--input", str(folder), "--out", str(out), "--labels", "folder",
                        "--classes", str(classes), "--workers", "1"]) == 0
    assert {r["raw"]: r["label"] for r in read_back(str(out)).values()} == {"red": 0, "green": 1, "blue": 2}
    classes.write_text("red\ngreen\n")
    assert make_shards(["--input", str(folder), "--out", str(tmp_path / "o2"), "--labels", "folder",
                        "--classes", str(classes)]) == 2
    assert f"{folder}/blue: class folder 'blue' is not in --classes" in capsys.readouterr().err
    classes.write_text("red\ngreen\nred\n")
    assert make_shards(["--input", str(folder), "--out", str(tmp_path / "o3"), "--labels", "folder",
                        "--classes", str(classes)]) == 2
    assert "classes.txt:3: class 'red' repeats line 1" in capsys.readouterr().err
    loose = tmp_path / "loose"
    (loose / "cat").mkdir(parents=True)
    (loose / "cat" / "a.jpg").write_bytes(jpeg(1))
    (loose / "b.jpg").write_bytes(jpeg(2))
    assert make_shards(["--input", str(loose), "--out", str(tmp_path / "o4"), "--labels", "folder"]) == 2
    assert f"{loose}/b.jpg: --labels folder needs every image inside a class subfolder" in capsys.readouterr().err


def test_column_labels_from_tables(tmp_path, capsys):
    pd.DataFrame({"key": ["p0", "p1"], "jpg": [jpeg(1), jpeg(2)], "caption": ["a", "b"],
                  "cls": [3, 0]}).to_parquet(tmp_path / "val.parquet")
    out = tmp_path / "p"
    assert make_shards(["--input", str(tmp_path / "val.parquet"), "--out", str(out), "--labels", "cls",
                        "--workers", "1"]) == 0
    rows = read_back(str(out))
    assert (rows["p0"]["label"], rows["p1"]["label"], rows["p0"]["raw"]) == (3, 0, "a")

    # Class names through --classes; no text column: the class name is the raw text.
    (tmp_path / "img.jpg").write_bytes(jpeg(3))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    pd.DataFrame({"key": ["c0", "c1", "c2"], "image_path": ["img.jpg"] * 3,
                  "cls": ["dog", "1", "cat"]}).to_csv(tmp_path / "val.csv", index=False)
    base = ["--input", str(tmp_path / "val.csv"), "--labels", "cls", "--classes", str(tmp_path / "classes.txt"),
            "--workers", "1"]
    assert make_shards(base + ["--out", str(tmp_path / "c")]) == 0
    rows = read_back(str(tmp_path / "c"))
    assert [(rows[k]["label"], rows[k]["raw"]) for k in ("c0", "c1", "c2")] == [(1, "dog"), (1, "dog"), (0, "cat")]

    for bad, message in (("bird", "label 'bird' in column 'cls' is not a class index"),
                         ("7", "label 7 in column 'cls' is out of range")):
        pd.DataFrame({"key": ["c0", "c1"], "image_path": ["img.jpg"] * 2, "cls": ["cat", bad]}).to_csv(
            tmp_path / "val.csv", index=False)
        assert make_shards(base + ["--out", str(tmp_path / f"bad{bad}")]) == 2
        assert f"val.csv:row1: {message}" in capsys.readouterr().err
    assert make_shards(["--input", str(tmp_path / "val.parquet"), "--out", str(tmp_path / "x"),
                        "--labels", "nope"]) == 2
    assert "--labels 'nope': no such column" in capsys.readouterr().err
