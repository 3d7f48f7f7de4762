"""The paper's text annotation steps: synthetic captions and tags from each image (a vision-language
model), then LLM descriptions from raw text, caption and tags. sources -> task -> chat model ->
quality gates -> resumable JSONL.

Modules: sources (JSONL/MDS input, key-hash sharding, caption joins), tasks (what a step asks and
judges; the description step), captions (caption and tag steps), prompt (versioned description
template), client (async OpenAI-compatible chat client), quality (answer gates), output (crash-safe
JSONL), bookkeeping (pending samples, counters, progress), runner (server path), offline (vllm.LLM
path), instruct (LLaMA-Factory export), cli and caption_cli.
"""

from rwkvclip_dist.descriptions.bookkeeping import RunConfig, RunStats
from rwkvclip_dist.descriptions.captions import CaptionTask, TagTask, load_task
from rwkvclip_dist.descriptions.client import ClientConfig, ServerError
from rwkvclip_dist.descriptions.prompt import PromptTemplate, load_prompt
from rwkvclip_dist.descriptions.quality import QualityConfig, judge
from rwkvclip_dist.descriptions.sources import Sample, ShardSpec, SourceFields, iter_samples
from rwkvclip_dist.descriptions.tasks import DescribeTask, Task

__all__ = [
    "CaptionTask", "ClientConfig", "DescribeTask", "PromptTemplate", "QualityConfig", "RunConfig", "RunStats",
    "Sample", "ServerError", "ShardSpec", "SourceFields", "TagTask", "Task", "iter_samples", "judge",
    "load_prompt", "load_task",
]  # fmt: skip
