"""CLIP BPE tokenizer (SPEC section 8) and the train/eval image transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rwkvclip_dist.data.tokenizer import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, tokenize
from rwkvclip_dist.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform


def test_short_text_is_wrapped_and_zero_padded():
    t = tokenize("a photo of a cat")
    assert t.shape == (1, CONTEXT_LENGTH) and t.dtype == torch.long
    n = int((t[0] != 0).sum())
    assert t[0, 0] == SOT_TOKEN and t[0, n - 1] == EOT_TOKEN and n == 7
    assert torch.all(t[0, n:] == 0)


def test_lowercased_and_whitespace_cleaned():
    a, b = tokenize(["A  Photo of\tthe DIGIT seven", "a photo of the digit seven"])
    assert torch.equal(a, b)


def test_truncation_forces_end_token_last():
    words = " ".join(f"word{i}" for i in range(120))
    t = tokenize([words, "short"], context_length=CONTEXT_LENGTH)
    assert t[0, -1] == EOT_TOKEN and t[0, 0] == SOT_TOKEN
    assert torch.all(t[0] != 0), "a truncated text fills every slot"
    # The kept prefix is the untruncated encoding's prefix: only the last slot was overwritten.
    full = tokenize(words, context_length=400)[0]
    assert torch.equal(t[0, :-1], full[:CONTEXT_LENGTH - 1])
    assert full[CONTEXT_LENGTH - 1] != EOT_TOKEN
    assert tokenize(words, context_length=16)[0, -1] == EOT_TOKEN


def test_bad_context_length_is_refused():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("x", context_length=1)


def test_transforms_shape_normalisation_and_eval_determinism():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    grey = Image.new("L", (50, 30), 128)
    ev = eval_transform(32)
    a, b = ev(img), ev(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    g = ev(grey)  # grey input becomes 3 channels with CLIP statistics applied per channel
    expect = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert g.shape == (3, 32, 32)
    assert torch.allclose(g[:, 16, 16], expect, atol=2e-2)
    tr = train_transform(32)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:]), "training crops never vary"
    flipped = train_transform(32, hflip=1.0)
    kept = train_transform(32, hflip=0.0)
    torch.manual_seed(1)
    x = flipped(img)
    torch.manual_seed(1)
    y = kept(img)
    assert torch.equal(x, y.flip(-1))
