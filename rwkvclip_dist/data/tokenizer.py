"""CLIP BPE tokenizer (SPEC section 8), written here so that no process imports open_clip for it.

``<start>`` = 49406, ``<end>`` = 49407, lower-cased and cleaned text, 77 tokens, zero padding, and on
truncation ``<end>`` is forced into the last slot so the text tower always pools a real end token.
The result is token-for-token open_clip's ``SimpleTokenizer(clean="lower")`` (tests/test_data_tokenizer.py
compares them on a large varied sample): importing ``open_clip`` costs seconds and ~400 MB per process
(it loads transformers and scikit-learn), which every training rank and tool paid for a 48,894-line table.

The table is OpenAI's CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``, MIT licence), read from the
installed open_clip package's folder without importing the package (open_clip is a dependency anyway).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges: 512 byte symbols + merges + 2 specials
_SPECIALS = ("<start_of_text>", "<end_of_text>")
# CLIP's pre-tokenizer: specials, English contractions, letter runs, single digits, punctuation runs.
# The specials come first, so a text that spells "<end_of_text>" gets the real token, as in CLIP.
_WORDS = regex.compile("|".join(_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       regex.IGNORECASE)


def vocab_path() -> Path:
    """The BPE table inside the installed open_clip package (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the CLIP BPE table {VOCAB_FILE} comes with open_clip_torch, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise ImportError(f"{path}: the installed open_clip_torch has no CLIP BPE table")
    return path


def _byte_symbols() -> dict[int, str]:
    """One printable character per byte value: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) take the characters from U+0100 on, so no BPE symbol is whitespace.
    Insertion order (printable bytes first) is the order of the vocabulary's first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


class BPE:
    """The vocabulary and merge ranks of one table; :meth:`encode` gives token ids without specials."""

    def __init__(self, path: Path):
        lines = gzip.open(path).read().decode("utf-8").split("\n")[1:_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != _MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: not a CLIP BPE table ({len(merges)} merge lines, {_MERGES} expected)")
        self.byte_symbol = _byte_symbols()
        singles = list(self.byte_symbol.values())  # ids 0-255; the same symbols ending a word are 256-511
        vocab = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        if (self.ids[_SPECIALS[0]], self.ids[_SPECIALS[1]]) != (SOT_TOKEN, EOT_TOKEN):
            raise ValueError(f"{path}: <start>/<end> are {self.ids[_SPECIALS[0]]}/{self.ids[_SPECIALS[1]]}, "
                             f"SPEC section 8 needs {SOT_TOKEN}/{EOT_TOKEN}")
        self.word_ids = lru_cache(maxsize=1 << 16)(self._word_ids)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until no pair is in the table."""
        if word in _SPECIALS:
            return (self.ids[word],)
        symbols = [self.byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.ids[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _WORDS.findall(clean(text)):
            ids.extend(self.word_ids(word))
        return ids


def clean(text: str) -> str:
    """CLIP's "lower" cleaning: ftfy's repairs, HTML entities unescaped twice, whitespace runs as one
    space, lower case."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


@lru_cache(maxsize=1)
def _bpe() -> BPE:
    # Built once per process: reading the 48,894-merge table takes ~0.2 s.
    return BPE(vocab_path())


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """Tokenize one text or a list into a ``LongTensor[N, context_length]``: ``<start>``, the text's
    tokens, ``<end>``, zeros; a text that does not fit keeps its first ``context_length - 1`` tokens and
    ends with ``<end>`` (the SPEC rule, and CLIP's)."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for <start> and <end>), got {context_length}")
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *_bpe().encode(text), EOT_TOKEN]
        if len(ids) > context_length:
            ids = ids[:context_length - 1] + [EOT_TOKEN]
        out[row, :len(ids)] = torch.tensor(ids)
    return out


def count_tokens(text: str) -> int:
    """BPE tokens of ``text`` as the text tower sees them, without ``<start>``/``<end>``: the text fits
    the context untruncated when this is at most ``CONTEXT_LENGTH - 2``."""
    return len(_bpe().encode(text))
