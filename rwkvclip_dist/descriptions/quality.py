"""Quality gates on generated descriptions.

An answer is rejected, with a reason tag counted in the run summary, when it is empty, a refusal,
over-long (more CLIP BPE tokens than the text tower's 77-token context holds, or cut off by the
completion cap), carries web noise (URL, file name, price), or contradicts its grounding. The
grounding rule (docs/descriptions.md, "Grounding gate") only judges words from a closed vocabulary
of concrete objects (vocabulary.json), so it errs towards accepting:

* object: a vocabulary concept the description mentions (not negated) must appear in a tag or in
  the caption, whenever the sample has tags or a caption at all;
* count: a number the description puts on a concept must be one the caption puts on it, whenever
  the caption gives one;
* colour: a colour the description gives a concept must be one the caption gives it, or a tag,
  whenever the caption colours that concept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rwkvclip_dist.descriptions.sources import Sample

VOCABULARY = Path(__file__).parent / "vocabulary.json"

NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
COLOURS = {
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
    "black", "white", "gray", "grey", "silver", "gold", "golden",
}  # fmt: skip
_SAME_COLOUR = {"grey": "gray", "golden": "gold"}
_NEGATIONS = {"no", "not", "without", "nor", "never"}
# Words that end the phrase in front of a noun: a number or colour beyond them belongs elsewhere.
_PHRASE_BREAKS = {
    "of", "with", "in", "on", "at", "near", "next", "beside", "by", "from", "to", "under",
    "over", "behind", "above", "below", "is", "are", "was", "were", "has", "have", "while",
}  # fmt: skip
_LOOKBACK = 4

_REFUSAL = re.compile(
    r"^(?:i'?m sorry|sorry\b|i apologi[sz]e|unfortunately)"
    r"|\b(?:as an ai|language model|i (?:cannot|can't|can not|am unable|'m unable|won't|do not have)"
    r"|i'm not able|i am not able)\b",
    re.IGNORECASE,
)
_WEB_NOISE = re.compile(
    r"https?://|\bwww\.|\b[\w-]+\.(?:com|org|net|jpe?g|png|gif|webp|bmp|tiff?)\b|[$€£¥]\s?\d",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"^\s*\**\s*(?:generated\s+)?(?:description|caption)\s*\**\s*:\s*\**\s*", re.IGNORECASE)
_QUOTES = ('"', "'", "\u201c", "\u201d", "\u2018", "\u2019")
_TOKEN = re.compile(r"[a-z]+|\d+|[.,;:!?()\"]")


# The text tower reads 77 tokens, <start> and <end> included (data/tokenizer.py).
MAX_TEXT_TOKENS = 75


@dataclass(frozen=True)
class QualityConfig:
    max_text_tokens: int = MAX_TEXT_TOKENS
    """Answers with more CLIP BPE tokens are rejected as 'too_long' (the tower would truncate them)."""
    check_grounding: bool = True
    """Apply the object/count/colour grounding gate."""


@dataclass(frozen=True)
class Verdict:
    text: str
    """The cleaned answer."""
    reason: str | None = None
    detail: str = ""
    value: Any = None
    """What is written when ``reason`` is None, if not ``text`` (the tag list of the tag step)."""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def result(self) -> Any:
        return self.text if self.value is None else self.value


def surface_problem(text: str, finish_reason: str | None, max_text_tokens: int | None) -> tuple[str, str] | None:
    """(reason, detail) for a cleaned answer that is empty, a refusal, cut off, over the token budget
    (``None``: no budget) or carries web noise; the checks every free-text step shares."""
    if not any(ch.isalpha() for ch in text):
        return "empty", "no words in the answer"
    if _REFUSAL.search(text):
        return "refusal", text[:80]
    if finish_reason == "length":
        return "too_long", "cut off by the max_tokens cap"
    if max_text_tokens is not None:
        from rwkvclip_dist.data.tokenizer import count_tokens  # open_clip's BPE: loaded on first use

        tokens = count_tokens(text)
        if tokens > max_text_tokens:
            return "too_long", f"{tokens} CLIP tokens > {max_text_tokens} (the text tower reads {max_text_tokens + 2})"
    noise = _WEB_NOISE.search(text)
    if noise:
        return "web_noise", f"contains {noise.group(0)!r}"
    return None


def clean(answer: str) -> str:
    """Strip reasoning blocks, a 'Description:' label, wrapping quotes and line breaks."""
    text = _THINK.sub(" ", answer)
    if "<think>" in text.lower():
        return ""  # reasoning never closed: the token cap cut it before any answer
    text = _LABEL.sub("", " ".join(text.split()))
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = _LABEL.sub("", text[1:-1].strip())
    return text


def judge(
    answer: str, sample: Sample, cfg: QualityConfig = QualityConfig(), finish_reason: str | None = None
) -> Verdict:
    text = clean(answer)
    problem = surface_problem(text, finish_reason, cfg.max_text_tokens)
    if problem is not None:
        return Verdict(text, *problem)
    if cfg.check_grounding:
        problem = grounding_problem(text, sample)
        if problem is not None:
            return Verdict(text, problem[0], problem[1])
    return Verdict(text)


@dataclass
class _Mention:
    concept: str
    counts: set[int] = field(default_factory=set)
    colours: set[str] = field(default_factory=set)
    negated: bool = False


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, str]:
    """Word form (one or two words) -> concept."""
    table = json.loads(VOCABULARY.read_text(encoding="utf-8"))
    lexicon: dict[str, str] = {}
    for concept, forms in table.items():
        if concept.startswith("_"):
            continue
        for form in forms:
            lexicon[form] = concept
            plurals = [form + "s", form + "es"]
            if form.endswith("y"):
                plurals.append(form[:-1] + "ies")
            for plural in plurals:
                lexicon.setdefault(plural, concept)
    return lexicon


def _mentions(text: str) -> list[_Mention]:
    tokens = _TOKEN.findall(text.lower())
    lexicon = _lexicon()
    found: list[_Mention] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        width = 2 if pair in lexicon else 1 if tokens[i] in lexicon else 0
        if width:
            concept = lexicon[pair] if width == 2 else lexicon[tokens[i]]
            found.append(_describe(tokens, i, concept, lexicon))
            i += width
        else:
            i += 1
    return found


def _describe(tokens: list[str], at: int, concept: str, lexicon: dict[str, str]) -> _Mention:
    """Read the numbers, colours and negation in the short phrase right before a noun."""
    mention = _Mention(concept)
    counting = True
    for j in range(at - 1, max(-1, at - 1 - _LOOKBACK), -1):
        word = tokens[j]
        if not word.isalnum() or word in _PHRASE_BREAKS or word in lexicon:
            break
        if word in ("and", "or"):
            # "red and white bus" keeps its colours; "two cats and dogs" must not count the dogs.
            counting = False
            if j == 0 or tokens[j - 1] not in COLOURS:
                break
            continue
        if word in _NEGATIONS:
            mention.negated = True
        elif word in COLOURS:
            mention.colours.add(_SAME_COLOUR.get(word, word))
        elif counting and (word in NUMBERS or (word.isdigit() and len(word) <= 2)):
            mention.counts.add(NUMBERS.get(word) or int(word))
    return mention


def grounding_problem(text: str, sample: Sample) -> tuple[str, str] | None:
    """(reason, detail) for the first claim the caption and tags contradict, else None."""
    caption = _mentions(sample.synthetic)
    tag_mentions = [m for tag in sample.tags for m in _mentions(tag)]
    tag_words = {word for tag in sample.tags for word in _TOKEN.findall(tag.lower())}
    tag_colours = {_SAME_COLOUR.get(w, w) for w in tag_words & COLOURS}
    supported = {m.concept for m in caption + tag_mentions}
    has_grounding = bool(sample.tags or sample.synthetic.strip())
    for mention in _mentions(text):
        if mention.negated:
            continue
        if has_grounding and mention.concept not in supported:
            return "contradiction_object", f"mentions {mention.concept!r}, absent from caption and tags"
        caption_counts = set().union(*(m.counts for m in caption if m.concept == mention.concept))
        if mention.counts and caption_counts and not mention.counts & caption_counts:
            return "contradiction_count", (
                f"{mention.concept!r}: description says {sorted(mention.counts)}, caption says {sorted(caption_counts)}"
            )
        caption_colours = set().union(*(m.colours for m in caption if m.concept == mention.concept))
        stray = mention.colours - caption_colours - tag_colours
        if caption_colours and stray:
            return "contradiction_colour", (
                f"{mention.concept!r}: description says {sorted(stray)}, caption says {sorted(caption_colours)}"
            )
    return None
