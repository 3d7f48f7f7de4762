"""Versioned instruction prompt for description generation.

A template file holds a fixed instruction and, after a line ``%%``, an input block with the
placeholders ``{raw}``, ``{caption}`` and ``{tags}``. Leading ``#`` lines are comments. The file stem
is the prompt version recorded in every output row, so outputs stay traceable to the exact wording.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from rwkvclip_dist.descriptions.sources import Sample

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_PROMPT = PROMPTS_DIR / "v2.txt"
_SEPARATOR = "%%"
_FIELDS = frozenset({"raw", "caption", "tags"})
# Shown in place of a missing source so the model knows it was absent rather than empty by mistake.
_MISSING = "(none)"


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    """Recorded as ``prompt_version`` in every output row (the template file's stem)."""
    instruction: str
    """Fixed task text: the alpaca ``instruction`` column of an --export-instruct set."""
    input_template: str
    """Per-sample block with {raw}, {caption}, {tags}: the alpaca ``input`` column."""
    max_raw_chars: int = 1000
    """Web text is cut to this many characters; long page dumps only add noise and tokens."""

    def render_input(self, sample: Sample) -> str:
        raw = " ".join(sample.raw.split())[: self.max_raw_chars]
        return self.input_template.format(
            raw=raw or _MISSING,
            caption=" ".join(sample.synthetic.split()) or _MISSING,
            tags=", ".join(sample.tags) or _MISSING,
        )

    def render(self, sample: Sample) -> str:
        """The single user message sent to the chat model."""
        return f"{self.instruction}\n{self.render_input(sample)}"


def load_prompt(path: str | Path = DEFAULT_PROMPT) -> PromptTemplate:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    if _SEPARATOR not in lines:
        raise ValueError(f"prompt template {path}: no '{_SEPARATOR}' line between instruction and input")
    cut = lines.index(_SEPARATOR)
    instruction = "\n".join(lines[:cut]).strip()
    input_template = "\n".join(lines[cut + 1 :]).strip()
    if not instruction:
        raise ValueError(f"prompt template {path}: the instruction before '{_SEPARATOR}' is empty")
    names = {name for _, name, _, _ in string.Formatter().parse(input_template) if name is not None}
    if names != _FIELDS:
        raise ValueError(
            f"prompt template {path}: input block must use exactly the placeholders "
            f"{sorted(_FIELDS)}, found {sorted(names)}"
        )
    if "{" in instruction or "}" in instruction:
        raise ValueError(f"prompt template {path}: placeholders belong after '{_SEPARATOR}', not in the instruction")
    return PromptTemplate(version=path.stem, instruction=instruction, input_template=input_template)
