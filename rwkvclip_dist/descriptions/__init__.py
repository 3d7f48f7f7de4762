"""LLM description generation: sources -> prompt -> chat model -> quality gates -> resumable JSONL.

Modules: sources (JSONL/MDS input, key-hash sharding), prompt (versioned template), client (async
OpenAI-compatible chat client), quality (answer gates), output (crash-safe JSONL), bookkeeping
(pending samples, counters, progress), runner (server path), offline (vllm.LLM path), instruct
(LLaMA-Factory export), cli.
"""

from rwkvclip_dist.descriptions.bookkeeping import RunConfig, RunStats
from rwkvclip_dist.descriptions.client import ClientConfig, ServerError
from rwkvclip_dist.descriptions.prompt import PromptTemplate, load_prompt
from rwkvclip_dist.descriptions.quality import QualityConfig, judge
from rwkvclip_dist.descriptions.sources import Sample, ShardSpec, SourceFields, iter_samples

__all__ = [
    "ClientConfig", "PromptTemplate", "QualityConfig", "RunConfig", "RunStats", "Sample", "ServerError",
    "ShardSpec", "SourceFields", "iter_samples", "judge", "load_prompt",
]  # fmt: skip
