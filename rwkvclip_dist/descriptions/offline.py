"""Offline generation with ``vllm.LLM`` on the local GPUs, no server in between.

Same pending-sample selection, gates, retries and output as the server path (bookkeeping.py); only
the model call differs: batches of prompts go through ``LLM.chat`` and rejected answers are asked
again in one more batch at the retry temperature.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from rwkvclip_dist.descriptions.bookkeeping import Recorder, RunConfig, RunStats
from rwkvclip_dist.descriptions.sources import check_input
from rwkvclip_dist.descriptions.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineConfig:
    model: str
    """Hugging Face id or local path of the model, as vllm.LLM(model=...) takes it."""
    batch_size: int = 1024
    """Prompts handed to vLLM at once; its scheduler batches them further on the GPU."""
    temperature: float = 0.2
    max_tokens: int = 256
    tensor_parallel_size: int = 1


def _import_vllm():  # returns the vllm module, which has no type stubs where it is missing
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "--offline-vllm needs the 'vllm' package (a CUDA build, on a GPU machine), but it cannot be "
            f"imported here ({err}). Install it with 'pip install vllm' or use --base-url with a running server."
        ) from err
    return vllm


def run_offline(cfg: RunConfig, offline: OfflineConfig, task: Task) -> RunStats:
    """Run ``task`` with vllm.LLM; image steps need a vision-language model (LLM.chat takes the
    same image_url parts as the server)."""
    vllm = _import_vllm()
    check_input(cfg.input)  # before loading the model, which takes minutes
    llm = vllm.LLM(model=offline.model, tensor_parallel_size=offline.tensor_parallel_size)
    first = vllm.SamplingParams(temperature=offline.temperature, max_tokens=offline.max_tokens)
    again = vllm.SamplingParams(
        temperature=max(offline.temperature, cfg.retry_temperature), max_tokens=offline.max_tokens
    )
    recorder = Recorder(cfg, task, model=offline.model)
    try:
        pending = recorder.pending()
        while batch := list(itertools.islice(pending, offline.batch_size)):
            for attempt in range(cfg.quality_retries + 1):
                params = first if attempt == 0 else again
                conversations = [task.messages(s) for s in batch]
                outputs = llm.chat(conversations, params, use_tqdm=False)
                last_try = attempt == cfg.quality_retries
                batch = [
                    sample
                    for sample, out in zip(batch, outputs, strict=True)
                    if not recorder.settle(
                        sample,
                        out.outputs[0].text,
                        out.outputs[0].finish_reason,
                        last_try=last_try,
                        retried=attempt > 0,
                    )
                ]
                if not batch:
                    break
    finally:
        recorder.close()
    return recorder.stats
