"""CLIP BPE tokenizer (SPEC section 8) and the train/eval image transforms."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from rwkvclip_dist.data.tokenizer import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, count_tokens, tokenize
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


# Pieces of the comparison sample: every character class CLIP's pre-tokenizer and cleaning treat apart.
_PIECES = [
    "a", "photo", "of", "the", "CAT", "Dog's", "DON'T", "we're", "i'll", "they've", "I'm", "he'd", "o'clock",
    "2024", "3.14", "1,000,000", "x2", "B-52", "e-mail", "U.S.A.", "--", "...", "?!", "(hi)", "[x]", "{}",
    "#tag", "@user", "http://example.com/a?b=c&d=e", "50%", "$9.99", "a/b", "_under_score_", "~", "`", "^",
    "café", "naïve", "Straße", "ÆØÅ", "İstanbul", "ΣΊΣΥΦΟΣ", "москва", "日本語の文章", "中文", "한국어",
    "العربية", "हिन्दी", "ไทย", "עברית", "e\u0301", "ﬁ", "²", "½", "Ⅻ", "٣", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ＦＵＬＬ",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "☃", "🦄🦄", "©", "™", "°C", "€", "£", "¥", "§", "¶", "•", "–", "—",
    "“quoted”", "‘single’", "«guillemets»", "&amp;", "&lt;b&gt;", "&#39;", "&amp;amp;", "&nbsp;", "Ã©tÃ©",
    "â€™", "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "\x00", "\x07", "\u200b", "\ufeff", "\ud7ff",
]
_SPACES = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", ""]


def _sample_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\t\n ", "a", "A photo of a cat.", " ".join(["word"] * 200), "😀" * 90, "ab" * 500]
    for _ in range(n):
        words = rng.choices(_PIECES, k=rng.choice([1, 3, 8, 20, 60, 150]))
        texts.append("".join(w + rng.choice(_SPACES) for w in words))
    # Random code points from the whole Basic Multilingual Plane and beyond, surrogates left out.
    for _ in range(n // 4):
        texts.append("".join(chr(c) for c in (rng.randrange(0x20, 0x2FFFF) for _ in range(rng.randrange(1, 40)))
                             if not 0xD800 <= c < 0xE000))
    return texts


def test_equal_to_open_clip_token_for_token():
    """Our BPE against open_clip's ``SimpleTokenizer`` (the reference: CLIP's own code) on ~1,260 texts
    of every character class, at the training context, a short one (truncation) and an untruncated one."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer(context_length=CONTEXT_LENGTH, clean="lower")
    texts = _sample_texts(1000)
    for length in (CONTEXT_LENGTH, 8, 2):
        ours, theirs = tokenize(texts, context_length=length), reference(texts, context_length=length)
        differ = [texts[i] for i in (ours != theirs).any(1).nonzero().flatten().tolist()]
        assert not differ, f"context {length}: {len(differ)} texts differ, first {differ[0]!r}"
    truncated = sum(len(reference.encode(t)) > CONTEXT_LENGTH - 2 for t in texts)
    assert truncated > 150, "the sample must exercise truncation"
    assert [count_tokens(t) for t in texts] == [len(reference.encode(t)) for t in texts]


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
