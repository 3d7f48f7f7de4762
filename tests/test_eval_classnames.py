"""Zero-shot class names: the ImageNet-1k names of open_clip for the shipped ``imagenet`` template set
and for WordNet-id folders, the recipes' in-loop ImageNet evaluations, refusal of identifier-like
names, and MDS directories written by tools/make_shards.py read by tools/evaluate.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rwkvclip_dist.eval.classnames import class_names, load_class_prompts
from rwkvclip_dist.pretrained import load_model, save_pretrained
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parent.parent
# tench (label 0), goldfish (1), toilet tissue (999): the WordNet ids of a standard ImageNet val tree.
WNIDS = ["n01440764", "n01443537", "n15075141"]


def _library_names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _image_tree(root: Path, folders: list[str], per_class: int = 2) -> Path:
    gen = torch.Generator().manual_seed(0)
    for name in folders:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(load_model("tiny"), tmp_path_factory.mktemp("m") / "tiny.safetensors")


def test_the_imagenet_template_set_carries_open_clips_names_in_wordnet_order():
    prompts = load_class_prompts("imagenet")
    assert prompts["classnames"] == _library_names() and len(prompts["templates"]) == 80
    ids = prompts["wordnet_ids"]
    assert len(ids) == 1000 and ids == sorted(ids) and ids[0] == WNIDS[0] and ids[-1] == WNIDS[-1]


def test_wordnet_folders_get_imagenet_names_with_any_template_set(tmp_path):
    names = _library_names()
    expected = [names[0], names[1], names[999]]
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"templates": ["a photo of a {c}."]}))
    for templates in ("imagenet", str(own)):  # with the set's ids, and from the library directly
        assert class_names(load_class_prompts(templates), WNIDS, None, "val") == expected
    # A full tree's sorted folders are the labels 0..999 in order.
    assert class_names(load_class_prompts("imagenet"), load_class_prompts("imagenet")["wordnet_ids"], None, "val") == names


@pytest.mark.parametrize("folders, templates, fragment", [
    (["n01440764", "n09999999"], None, "'n09999999'"),           # a WordNet id outside ImageNet-1k
    (["class_0", "class_1"], None, "'class_0', 'class_1'"),
    (None, {"templates": ["a {c}."], "classnames": ["cat", "id00017"]}, "'id00017'"),
])
def test_identifier_like_class_names_are_refused(tmp_path, folders, templates, fragment):
    prompts = templates or {"templates": ["a {c}."]}
    with pytest.raises(ValueError) as err:
        class_names(prompts, folders, None, "some/val")
    assert "look like identifiers" in str(err.value) and fragment in str(err.value)
    assert class_names({"templates": ["{c}"]}, [str(d) for d in range(10)], None, "digits") == list("0123456789")


def test_evaluate_tool_on_a_wordnet_tree_and_its_refusal(tmp_path, model_file, capsys, monkeypatch):
    monkeypatch.setenv("RWKVCLIP_NO_PROGRESS", "1")
    main = tool_main("evaluate")
    tree = _image_tree(tmp_path / "val", WNIDS)
    out = tmp_path / "r.json"
    assert main(["--model", str(model_file), "--task", "zeroshot", "--data", str(tree), "--templates", "imagenet",
                 "--workers", "0", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["zeroshot"]["n"] == 6
    odd = _image_tree(tmp_path / "odd", ["n01440764", "n09999999"], per_class=1)
    assert main(["--model", str(model_file), "--task", "zeroshot", "--data", str(odd), "--templates", "imagenet",
                 "--workers", "0", "--output", str(tmp_path / "r2.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: ") and "look like identifiers" in err[0]


def _labelled_mds(path: Path, n: int = 4) -> Path:
    import io

    from streaming import MDSWriter

    with MDSWriter(out=str(path), columns={"key": "str", "jpg": "bytes", "label": "int"}, compression="zstd") as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(buf, format="JPEG")
            w.write({"key": f"k{i}", "jpg": buf.getvalue(), "label": [0, 1, 999, 5][i]})
    return path


@pytest.mark.parametrize("recipe", ["rwkvclip_b32_yfcc15m.yaml", "rwkvclip_b16_laion.yaml", "rwkvclip_l14_laion.yaml"])
def test_the_imagenet_recipes_in_loop_evaluation_gets_its_class_names(tmp_path, recipe):
    """The recipes' own ``eval.zeroshot`` entry, opened as the trainer opens it (before any process
    group): an ImageNet val MDS directory (labels, no names) and a WordNet-id folder tree."""
    from rwkvclip_dist.training.evals import open_evaluations
    from rwkvclip_dist.training.recipe import load_recipe

    names = _library_names()
    for data, expected in ((_labelled_mds(tmp_path / "mds"), names),
                           (_image_tree(tmp_path / "tree", WNIDS, per_class=1), [names[0], names[1], names[999]])):
        loaded = load_recipe(REPO / "recipes" / recipe, [f"eval.zeroshot.0.data={data}"])
        (task,) = open_evaluations(loaded.eval.zeroshot, loaded.model.name, loaded.model.overrides,
                                   torch.device("cpu"))
        assert task.classnames == expected and len(task.templates) == 80


def test_evaluate_reads_the_mds_directories_make_shards_writes(tmp_path, model_file, capsys, monkeypatch):
    """make_shards writes one part sub-folder per input unit under a merged index.json; evaluate.py
    reads those shards (their columns are reported) instead of failing on a missing shard file."""
    images = _image_tree(tmp_path / "images", ["a", "b"], per_class=2)
    for image in images.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of {image.parent.name}")
    out = tmp_path / "shards"
    assert tool_main("make_shards")(["--input", str(images), "--out", str(out), "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert all("/" in s["raw_data"]["basename"] for s in index["shards"]), "shards live in part sub-folders"
    capsys.readouterr()
    monkeypatch.setenv("RWKVCLIP_NO_PROGRESS", "1")
    assert tool_main("evaluate")(["--model", str(model_file), "--task", "zeroshot", "--data", str(out),
                                  "--templates", "cifar10", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MDS shards need 'jpg' and 'label' columns, found" in err[0] and "'jpg'" in err[0]
