"""Inference API: safetensors round trip, refusal of mismatched files, CLIP_benchmark compatibility,
and the standalone vision encoder. All on the 'tiny' config and the digits demo data."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from rwkvclip_dist.pretrained_format import StateDictMismatch
from rwkvclip_dist.eval.datasets import MDSLabelledImages
from rwkvclip_dist.eval.features import LoaderConfig, image_features
from rwkvclip_dist.eval.zeroshot import build_zeroshot_classifier, zeroshot_from_features
from rwkvclip_dist.pretrained import (
    create_model_and_transforms,
    get_tokenizer,
    load_checkpoint,
    load_model,
    load_vision_encoder,
    save_pretrained,
)
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "tiny.safetensors"
    model = load_model("tiny")
    save_pretrained(model, path)
    return model, path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from rwkvclip_dist.data.shards.demo_digits import CLASSNAMES, TEMPLATES, ensure_demo_data

    root = ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "digits"))
    return root, CLASSNAMES, TEMPLATES


def test_round_trip_gives_identical_embeddings(saved):
    model, path = saved
    loaded, train_tf, eval_tf = create_model_and_transforms("tiny", pretrained=path)
    images = torch.randn(2, 3, 32, 32)
    tokens = get_tokenizer("tiny")(["a red digit", "the number seven"])
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    assert path.with_suffix(".json").is_file() and not loaded.training
    # Both transforms give the model's resolution and the same normalisation: a flat colour stays one
    # value per channel whatever the crop.
    from PIL import Image

    flat = Image.new("RGB", (48, 40), (200, 120, 30))
    for transform in (train_tf, eval_tf):
        out = transform(flat)
        assert out.shape == (3, 32, 32)
        torch.testing.assert_close(out.mean(dim=(1, 2)), eval_tf(flat).mean(dim=(1, 2)), atol=2e-2, rtol=0)


def test_overrides_are_recorded_and_name_must_agree(tmp_path):
    model = load_model("tiny", **{"image.depth": 1})
    path = save_pretrained(model, tmp_path / "d1.safetensors")
    assert load_model(None, pretrained=path).config.image.depth == 1
    with pytest.raises(ValueError, match="holds a 'tiny' model"):
        load_model("RWKV-CLIP-B-32", pretrained=path)


def test_mismatched_file_is_refused_without_partial_load(saved):
    _, path = saved
    deeper = load_model("tiny", **{"image.depth": 3})
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(StateDictMismatch, match="missing: visual.blocks.2"):
        load_checkpoint(deeper, path)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())


def test_pickles_are_read_weights_only(tmp_path, saved):
    model, _ = saved
    good = tmp_path / "ok.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, good)
    load_checkpoint(load_model("tiny"), good)  # wrapper dict and DDP prefix are handled
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "payload": pickle.PickleError("not a tensor")}, evil)
    with pytest.raises(ValueError, match=rf"{evil}: not a readable torch checkpoint .*more than tensors"):
        load_checkpoint(load_model("tiny"), evil)


def test_clip_benchmark_zeroshot_runs_our_model_unchanged(tmp_path, saved, digits):
    """CLIP_benchmark's own zero-shot routine on the digits held-out split, compared with ours."""
    from clip_benchmark.metrics import zeroshot_classification as cb

    _, path = saved
    root, classnames, templates = digits
    templates = [t.replace("{}", "{c}") for t in templates]  # CLIP_benchmark fills '{c}'
    model, _, eval_tf = create_model_and_transforms(None, pretrained=path)
    dataset = MDSLabelledImages(f"{root}/heldout", eval_tf)
    subset = Subset(dataset, range(32))
    subset.classes = classnames  # CLIP_benchmark reads dataset.classes
    loader = DataLoader(subset, batch_size=16)
    tokenizer = get_tokenizer("tiny")
    theirs = cb.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False, save_clf=str(tmp_path / "clf.pt"))
    ours_clf = build_zeroshot_classifier(model, classnames, templates, tokenizer)
    torch.testing.assert_close(ours_clf, torch.load(tmp_path / "clf.pt", weights_only=True))
    features, labels = image_features(model, subset, LoaderConfig(batch_size=16, num_workers=0))
    ours = zeroshot_from_features(features, labels, ours_clf)
    assert ours["n"] == 32
    assert ours["top1"] == pytest.approx(theirs["acc1"])
    assert ours["top5"] == pytest.approx(theirs["acc5"])
    assert ours["mean_per_class"] == pytest.approx(theirs["mean_per_class_recall"])


def test_vision_encoder_export_loads_alone(tmp_path, saved):
    main = tool_main("export_vision_encoder")
    model, path = saved
    out = tmp_path / "vision.safetensors"
    assert main([str(path), str(out)]) == 0
    encoder = load_vision_encoder(out)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, tokens = encoder(images)
        ref_pooled, ref_tokens = model.eval().encode_image(images, return_tokens=True)
    assert tokens.shape == (2, model.config.image.num_patches, model.config.image.width)
    assert torch.equal(pooled, ref_pooled) and torch.equal(tokens, ref_tokens)
    assert not any(k.startswith("text") for k in encoder.state_dict())
    with pytest.raises(ValueError, match="expected 'vision_encoder'"):
        load_vision_encoder(path)
