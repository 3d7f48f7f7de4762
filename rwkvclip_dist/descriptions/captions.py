"""The caption and tag steps: a vision-language model looks at each image (SPEC section 8 inputs).

The paper captions with OFA and tags with RAM++; here any vision-language model behind an
OpenAI-compatible server (``vllm serve Qwen/Qwen2-VL-7B-Instruct``, ...) or ``vllm.LLM`` does both,
one request per image: a user message with the image as a base64 ``data:`` URL plus a versioned
instruction (prompts/caption/, prompts/tags/). Answers go through the same gates as descriptions
where they apply; the results fill ``synthetic`` and ``tags`` of the shared JSONL contract.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvclip_dist.descriptions.prompt import PROMPTS_DIR
from rwkvclip_dist.descriptions.quality import MAX_TEXT_TOKENS, Verdict, clean, surface_problem
from rwkvclip_dist.descriptions.sources import Sample
from rwkvclip_dist.descriptions.tasks import Task

DEFAULT_PROMPTS = {"caption": PROMPTS_DIR / "caption" / "v1.txt", "tags": PROMPTS_DIR / "tags" / "v1.txt"}
_SIGNATURES = (  # what a vision-language server decodes; anything else fails before any request
    (b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)  # fmt: skip
_TAG_SPLIT = re.compile(r"[,;|\n]+")
_TAG_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")
_TAG_LABEL = re.compile(r"^\s*\**\s*tags?\s*\**\s*:\s*", re.IGNORECASE)


def image_type(data: bytes) -> str | None:
    """MIME type of encoded image bytes from their signature, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _SIGNATURES if data.startswith(magic)), None)


def data_url(data: bytes) -> str:
    return f"data:{image_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def load_instruction(path: str | Path) -> tuple[str, str]:
    """(version, instruction) of a caption or tag prompt file: '#' comment lines, then plain text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#")).strip()
    if not text:
        raise ValueError(f"prompt file {path}: no instruction after the comment lines")
    if "{" in text or "%%" in text:
        raise ValueError(f"prompt file {path}: caption and tag prompts take no placeholders (the image is the input)")
    return path.stem, text


@dataclass(frozen=True)
class _ImageTask(Task):
    version: str
    instruction: str
    needs_image = True

    def missing_input(self, sample: Sample) -> tuple[str, str] | None:
        if not sample.image:
            return "no_image", "no image bytes (empty MDS column, or the JSONL image_path is unset or no file)"
        if image_type(sample.image) is None:
            return "bad_image", f"not a JPEG, PNG, GIF or WebP file (starts with {sample.image[:8]!r})"
        return None

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(sample.image)}},
            {"type": "text", "text": self.instruction},
        ]}]  # fmt: skip


@dataclass(frozen=True)
class CaptionTask(_ImageTask):
    """One short literal sentence per image, written as ``synthetic``."""

    max_text_tokens: int = MAX_TEXT_TOKENS
    name = "caption"
    field = "synthetic"
    rate_label = "captions/s"

    def judge(self, answer: str, sample: Sample, finish_reason: str | None) -> Verdict:
        text = clean(answer)
        problem = surface_problem(text, finish_reason, self.max_text_tokens)
        return Verdict(text, *problem) if problem else Verdict(text)


@dataclass(frozen=True)
class TagTask(_ImageTask):
    """A list of short tags per image, written as ``tags`` (a JSON list of strings)."""

    max_tags: int = 20
    """Longer lists keep their first (most prominent) tags."""
    max_tag_words: int = 4
    """A longer item means the model wrote prose, not tags: the answer is rejected."""
    name = "tags"
    field = "tags"
    rate_label = "tag lists/s"

    def judge(self, answer: str, sample: Sample, finish_reason: str | None) -> Verdict:
        text = _TAG_LABEL.sub("", clean(answer.replace("\n", ", ")))
        problem = surface_problem(text, finish_reason, None)
        if problem:
            return Verdict(text, *problem)
        tags: list[str] = []
        for item in _TAG_SPLIT.split(text):
            tag = " ".join(_TAG_BULLET.sub("", item).strip(" .\"'`*").lower().split())
            if tag and tag not in tags:
                tags.append(tag)
        if not tags:
            return Verdict(text, "empty", "no tags in the answer")
        prose = next((t for t in tags if len(t.split()) > self.max_tag_words), None)
        if prose is not None:
            return Verdict(text, "not_a_tag_list", f"{prose[:60]!r} has more than {self.max_tag_words} words")
        return Verdict(text, value=tags[: self.max_tags])


def load_task(name: str, prompt: str | Path | None = None, **options: Any) -> _ImageTask:
    """The caption or tag step with its prompt file (default: the shipped v1)."""
    classes = {"caption": CaptionTask, "tags": TagTask}
    if name not in classes:
        raise ValueError(f"unknown step {name!r}; expected one of {sorted(classes)}")
    version, instruction = load_instruction(prompt or DEFAULT_PROMPTS[name])
    return classes[name](version=version, instruction=instruction, **options)
