"""Authors' layout <-> ours: bit-exact round trip, refusal lists, and --verify against a direct
float64 evaluation of the authors' state dict. The authors' file is made by exporting a tiny model
(their real B/32 weights are not available offline); B/32 key shapes are checked without weights."""

from __future__ import annotations

import re

import pytest
import torch

from rwkvclip_dist.convert import authors as layout
from rwkvclip_dist.pretrained_format import StateDictMismatch, load_state_dict_file
from rwkvclip_dist.convert.pipeline import authors_to_ours, expected_shapes, ours_to_authors, verify_authors
from rwkvclip_dist.model.registry import get_model_config
from rwkvclip_dist.pretrained import load_model, save_pretrained
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(120)


convert_main = tool_main("convert_checkpoint")


@pytest.fixture(scope="module")
def ours_file(tmp_path_factory):
    torch.manual_seed(0)
    model = load_model("tiny")
    with torch.no_grad():  # spread the lerps over [-0.5, 1.5] so 1 - a is exercised off [0.5, 1]
        for name, p in model.named_parameters():
            if ".maa_" in name:
                p.uniform_(-0.5, 1.5)
            elif ".ffn." in name:  # init leaves the channel mix nearly silent; make it matter
                p.normal_(0.0, 0.3)
    return save_pretrained(model, tmp_path_factory.mktemp("ours") / "tiny.safetensors")


def test_ours_authors_ours_is_bit_exact(tmp_path, ours_file):
    theirs = ours_to_authors(ours_file, tmp_path / "model_31.pt")
    back = tmp_path / "back.safetensors"
    authors_to_ours(tmp_path / "model_31.pt", back, "tiny")
    original, again = load_state_dict_file(ours_file), load_state_dict_file(back)
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert "image_model.layers.0.ffn.spatial_mix_k" in theirs and "text_model.blocks.1.ffn.time_maa_r" in theirs


def test_released_file_with_prefix_and_bf16_decays_verifies(tmp_path, ours_file, capsys):
    theirs = ours_to_authors(ours_file, tmp_path / "plain.pt", released_dtypes=True)
    assert theirs["text_model.blocks.0.att.time_decay"].dtype == torch.bfloat16
    released = tmp_path / "model_31.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in theirs.items()}, released)
    out = tmp_path / "converted.safetensors"
    assert convert_main(["from-authors", str(released), str(out), "--verify"]) == 0  # model inferred
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:"))
    cosines = [float(c) for c in re.findall(r"cosine ([0-9.]+)", line)]
    assert len(cosines) == 2, line
    assert min(cosines) > 0.99999, line
    # The image channel-mix lerp really is complementary: mapping it as-is breaks the embeddings.
    wrong = dict(theirs)
    for key in [k for k in wrong if "spatial_mix" in k]:
        wrong[key] = 1 - wrong[key]
    right, broken = verify_authors(out, theirs), verify_authors(out, wrong)
    assert right.image_max_abs < 1e-5 < 1e-3 < broken.image_max_abs


def test_mismatched_authors_file_is_refused_with_every_problem(tmp_path, ours_file, capsys):
    theirs = ours_to_authors(ours_file, tmp_path / "a.pt")
    del theirs["text_model.ln_out.bias"]
    theirs["image_model.extra_head.weight"] = torch.zeros(3)
    theirs["image_model.pos_embed"] = torch.zeros(1, 10, 64)
    torch.save(theirs, tmp_path / "bad.pt")
    dst = tmp_path / "never.safetensors"
    with pytest.raises(StateDictMismatch) as err:
        authors_to_ours(tmp_path / "bad.pt", dst, "tiny")
    text = str(err.value)
    assert "missing: text.ln_out.bias" in text
    assert "unexpected: image_model.extra_head.weight" in text
    assert "visual.pos_embed: file (1, 10, 64) vs model (1, 64, 64)" in text
    assert not dst.exists()
    # Without --model, the tool names the closest registered architecture and writes nothing.
    assert convert_main(["from-authors", str(tmp_path / "bad.pt"), str(dst)]) == 2
    assert "closest is 'tiny'" in capsys.readouterr().err and not dst.exists()


@pytest.mark.parametrize("name", ["RWKV-CLIP-B-32", "RWKV-CLIP-B-16"])
def test_paper_configs_map_onto_the_released_key_layout(name):
    """Shapes of SPEC section 10 for the paper configs (meta tensors, no weights allocated)."""
    config = get_model_config(name)
    shapes = expected_shapes(config)
    rows = layout.key_map(config.image.depth, config.text.depth)
    assert {ours for _, ours, _ in rows} == set(shapes)
    theirs = {t: shapes[o] for t, o, _ in rows}
    tokens = (224 // config.image.patch_size) ** 2
    assert theirs["image_model.pos_embed"] == (1, tokens, 640)
    assert theirs["image_model.layers.11.att.time_faaaa"] == (8, 80)
    assert theirs["text_model.blocks.5.att.time_faaaa"] == (10, 64)
    assert theirs["image_model.layers.0.ffn.key.weight"] == (3200, 640)
    assert theirs["text_model.blocks.0.ffn.value.weight"] == (640, 2240)
    assert theirs["image_model.layers.0.att.time_maa_w2"] == (5, 32, 640)
    assert "image_model.layers.1.ln0.weight" not in theirs and "text_model.blocks.0.ln0.weight" in theirs
