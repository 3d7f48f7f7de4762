"""What one annotation step asks of the model and how it judges the answer.

The description step (SPEC section 8) and the caption and tag steps (captions.py) share everything
else: pending samples, retries, crash-safe output, the server client and the offline vLLM path. A
task says which input a sample needs, the chat messages to send, how to judge an answer, and under
which field of the shared JSONL contract (``{key, synthetic?, generated?, tags?}``) the result goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rwkvclip_dist.descriptions.prompt import DEFAULT_PROMPT, PromptTemplate, load_prompt
from rwkvclip_dist.descriptions.quality import QualityConfig, Verdict, judge
from rwkvclip_dist.descriptions.sources import Sample


class Task:
    """Base of the annotation steps; subclasses fill in the four methods below."""

    name: str
    """Step name as the command line takes it: describe, caption, tags."""
    field: str
    """Output column of an accepted row: generated, synthetic or tags."""
    version: str
    """Prompt version written into every row (the prompt file's stem)."""
    needs_image: bool = False
    """Read the image bytes of each sample (MDS column or JSONL file path)."""
    rate_label: str
    """Progress-bar name of the rows written per second."""

    def missing_input(self, sample: Sample) -> tuple[str, str] | None:
        """(reason, detail) when the sample lacks what this step needs; it is then recorded failed."""
        raise NotImplementedError

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        """OpenAI chat messages for the sample (vLLM's LLM.chat takes the same list)."""
        raise NotImplementedError

    def judge(self, answer: str, sample: Sample, finish_reason: str | None) -> Verdict:
        raise NotImplementedError


@dataclass(frozen=True)
class DescribeTask(Task):
    """The LLM description from raw text, synthetic caption and tags (docs/descriptions.md)."""

    prompt: PromptTemplate
    quality: QualityConfig = QualityConfig()
    name = "describe"
    field = "generated"
    rate_label = "desc/s"

    @classmethod
    def load(cls, prompt_path=DEFAULT_PROMPT, quality: QualityConfig = QualityConfig()) -> DescribeTask:
        return cls(load_prompt(prompt_path), quality)

    @property
    def version(self) -> str:  # type: ignore[override]
        return self.prompt.version

    def missing_input(self, sample: Sample) -> tuple[str, str] | None:
        if sample.has_text:
            return None
        return "no_source_text", "raw text, caption and tags are all empty"

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.prompt.render(sample)}]

    def judge(self, answer: str, sample: Sample, finish_reason: str | None) -> Verdict:
        return judge(answer, sample, self.quality, finish_reason)
