"""CLIP BPE tokenizer (SPEC section 8): open_clip's vocabulary, shipped inside the package (no network).

``<start>`` = 49406, ``<end>`` = 49407, lower-cased and cleaned text, 77 tokens, zero padding, and on
truncation ``<end>`` is forced into the last slot so the text tower always pools a real end token.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    # Built once per process: loading the 262k-merge BPE table takes ~0.3 s.
    tok = SimpleTokenizer(context_length=CONTEXT_LENGTH, clean="lower")
    if tok.sot_token_id != SOT_TOKEN or tok.eot_token_id != EOT_TOKEN:
        raise RuntimeError(f"open_clip's BPE has <start>={tok.sot_token_id}, <end>={tok.eot_token_id}; "
                           f"SPEC section 8 needs {SOT_TOKEN}/{EOT_TOKEN}")
    return tok


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """Tokenize one text or a list into a ``LongTensor[N, context_length]``.

    open_clip's truncation keeps the first ``context_length - 1`` tokens and writes ``<end>`` last,
    which is exactly the SPEC rule (tested in tests/test_data_tokenizer.py).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for <start> and <end>), got {context_length}")
    return _tokenizer()(texts, context_length=context_length)


def count_tokens(text: str) -> int:
    """BPE tokens of ``text`` as the text tower sees them, without ``<start>``/``<end>``: the text fits
    the context untruncated when this is at most ``CONTEXT_LENGTH - 2``."""
    return len(_tokenizer().encode(text))
