"""Run an annotation step (describe, caption, tags) through an OpenAI-compatible server with bounded
concurrency."""

from __future__ import annotations

import asyncio
import logging

from rwkvclip_dist.descriptions.bookkeeping import Recorder, RunConfig, RunStats
from rwkvclip_dist.descriptions.client import ChatClient, ClientConfig, RequestFailed, ServerError
from rwkvclip_dist.descriptions.sources import Sample, check_input
from rwkvclip_dist.descriptions.tasks import DescribeTask, Task

log = logging.getLogger(__name__)

# Reasons that mean the server itself went away rather than one sample being bad.
_OUTAGE_REASONS = {"connection", "timeout"}


class _Run:
    def __init__(self, cfg: RunConfig, client: ChatClient, recorder: Recorder) -> None:
        self.cfg = cfg
        self.client = client
        self.recorder = recorder
        self.fatal: ServerError | None = None
        self._outage_streak = 0
        # Every request in flight may fail during an outage before any success resets the streak.
        self._outage_limit = 2 * client.cfg.concurrency + 8

    async def one(self, sample: Sample) -> None:
        messages = self.recorder.task.messages(sample)
        retried = False
        for attempt in range(self.cfg.quality_retries + 1):
            temperature = None if attempt == 0 else max(self.client.cfg.temperature, self.cfg.retry_temperature)
            try:
                result = await self.client.complete(messages, temperature=temperature)
            except RequestFailed as err:
                self.recorder.fail(sample, err.reason, err.detail, retried or err.attempts > 1)
                self._note_outage(err.reason)
                return
            except ServerError as err:
                self.fatal = self.fatal or err
                return
            self._outage_streak = 0
            retried = retried or result.retries > 0
            last_try = attempt == self.cfg.quality_retries
            if self.recorder.settle(sample, result.text, result.finish_reason, last_try=last_try, retried=retried):
                return
            retried = True

    def _note_outage(self, reason: str) -> None:
        self._outage_streak = self._outage_streak + 1 if reason in _OUTAGE_REASONS else 0
        if self._outage_streak >= self._outage_limit and self.fatal is None:
            self.fatal = ServerError(
                f"{self.client.cfg.api_root} stopped answering: {self._outage_streak} requests in a row failed "
                f"with {reason} after all retries; stopping (rerun to resume)"
            )

    async def drive(self) -> None:
        slots = asyncio.Semaphore(self.client.cfg.concurrency)
        in_flight: set[asyncio.Task[None]] = set()

        crash: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                crash.append(task.exception())  # e.g. a full disk: stop feeding new samples

        for sample in self.recorder.pending():
            await slots.acquire()
            if self.fatal is not None or crash:
                slots.release()
                break
            task = asyncio.create_task(self.one(sample))
            in_flight.add(task)
            task.add_done_callback(finished)
        if self.fatal is not None or crash:
            for task in list(in_flight):
                task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        if crash:
            raise crash[0]
        if self.fatal is not None:
            raise self.fatal


async def generate_online(cfg: RunConfig, client_cfg: ClientConfig, task: Task) -> RunStats:
    check_input(cfg.input)  # a typo in --input should not wait for, or blame, the server
    async with ChatClient(client_cfg) as client:
        await client.probe()
        recorder = Recorder(cfg, task, model=client_cfg.model)
        try:
            await _Run(cfg, client, recorder).drive()
        finally:
            recorder.close()
    return recorder.stats


def run_online(cfg: RunConfig, client_cfg: ClientConfig, task: Task | None = None) -> RunStats:
    """Run ``task`` (default: descriptions with the shipped prompt) over ``cfg.input``."""
    return asyncio.run(generate_online(cfg, client_cfg, task or DescribeTask.load()))
