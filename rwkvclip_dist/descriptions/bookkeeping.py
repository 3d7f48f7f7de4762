"""What a generation run owns besides the model calls: which samples are pending, the output and
failure files, the counters of the final summary and the progress bar. Shared by every step (tasks.py:
describe, caption, tags), the server client (runner.py) and the offline vLLM path (offline.py), so all
follow the same rules."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rwkvclip_dist.descriptions.output import JsonlAppender, first_row, recover
from rwkvclip_dist.descriptions.sources import (
    Sample, ShardSpec, SourceFields, apply_joins, count_samples, iter_samples, load_joins,
)  # fmt: skip
from rwkvclip_dist.descriptions.tasks import Task
from rwkvclip_dist.outputs import OutputError, check_apart, check_file_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    input: Path
    """A .jsonl file or an MDS directory (holding index.json)."""
    out: Path
    """Output JSONL; failures go to the same name with suffix .failures.jsonl."""
    fields: SourceFields = SourceFields()
    shard: ShardSpec = ShardSpec()
    joins: tuple[Path, ...] = ()
    """JSONL files whose ``synthetic``/``tags`` replace the input's per key (later files win), e.g. the
    caption and tag steps' outputs; only this shard's keys are held in memory."""
    quality_retries: int = 1
    """Fresh answers requested after a gate rejects one, before the sample is recorded as failed."""
    retry_temperature: float = 0.7
    """Floor on the temperature of quality retries, so greedy decoding cannot repeat the answer."""
    fsync_interval_s: float = 1.0
    """Most seconds between fsyncs; 0 syncs every row. Each row is written to the OS at once, so a
    killed process loses nothing; only a machine crash can lose the last interval, whose keys a
    rerun then simply generates again (per-row fsync caps a worker near 150 rows/s on a plain disk)."""
    progress: bool = True
    overwrite: bool = False
    """Replace an output written by another job (another step, model or prompt) instead of refusing."""

    @property
    def failures_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".failures.jsonl")


@dataclass
class RunStats:
    done: int = 0
    """Rows (descriptions, captions or tag lists) written by this run."""
    retried: int = 0
    """Samples that needed more than one request (transport trouble or a rejected answer)."""
    failed: Counter = field(default_factory=Counter)
    """Samples given up on, by reason."""
    already_done: int = 0
    other_shard: int = 0
    duplicate_keys: int = 0

    def summary(self) -> str:
        failed = ", ".join(f"{reason}={n}" for reason, n in sorted(self.failed.items())) or "none"
        return (
            f"done {self.done}, retried {self.retried}, failed {sum(self.failed.values())} ({failed}); "
            f"skipped: already done {self.already_done}, other shards {self.other_shard}, "
            f"duplicate keys {self.duplicate_keys}"
        )


class Recorder:
    """Writes accepted answers and failures exactly once per key and keeps the counters."""

    def __init__(self, cfg: RunConfig, task: Task, model: str) -> None:
        self.cfg = cfg
        self.task = task
        self.model = model
        self.stats = RunStats()
        check_file_path(cfg.out, "--out")
        check_apart(cfg.out, "--out", {"--input": cfg.input, **{f"--captions {p}": p for p in cfg.joins}})
        # Lock before recover(): the repair of a torn tail must not race another writer.
        self._out = JsonlAppender(cfg.out, cfg.fsync_interval_s, exclusive=True)
        try:
            self._claim_output(model)
            self._done = recover(cfg.out)
        except ValueError:
            self._out.close()
            raise
        self._claimed: set[str] = set()
        self._joined = load_joins(cfg.joins, cfg.shard)
        self._failures = JsonlAppender(cfg.failures_path, cfg.fsync_interval_s)
        self._bar = tqdm(
            total=count_samples(cfg.input), unit="sample", disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05
        )
        self._started = time.monotonic()
        self._last_postfix = 0.0

    def _claim_output(self, model: str) -> None:
        """Resume an output of this job (same step, model and prompt); another job's is refused unless
        ``overwrite``, which empties it and its failures file."""
        row = first_row(self.cfg.out)
        mine = {"field": self.task.field, "model": model, "prompt_version": self.task.version}
        if row is None or (self.task.field in row and row.get("model") == model
                           and row.get("prompt_version") == self.task.version):
            return
        theirs = {"field": next((k for k in row if k not in ("key", "model", "prompt_version")), None),
                  "model": row.get("model"), "prompt_version": row.get("prompt_version")}
        if not self.cfg.overwrite:
            raise OutputError(f"--out {self.cfg.out}: holds the rows of another job ({theirs}); this run writes "
                              f"{mine}: run with that job's options to resume it, choose another --out, or pass "
                              f"--overwrite to replace it")
        log.warning("--overwrite: replacing %s (rows of %s)", self.cfg.out, theirs)
        os.truncate(self.cfg.out, 0)
        if self.cfg.failures_path.exists():
            os.truncate(self.cfg.failures_path, 0)

    def pending(self) -> Iterator[Sample]:
        """Samples of this shard not yet written, each key once; the bar counts every input sample."""
        for sample in iter_samples(self.cfg.input, self.cfg.fields, with_image=self.task.needs_image):
            if not self.cfg.shard.owns(sample.key):
                self.stats.other_shard += 1
            elif sample.key in self._done:
                self.stats.already_done += 1
            elif sample.key in self._claimed:
                self.stats.duplicate_keys += 1
                log.warning("%s: key %r appears again; keeping its first sample", self.cfg.input, sample.key)
            else:
                self._claimed.add(sample.key)
                sample = apply_joins(sample, self._joined)
                missing = self.task.missing_input(sample)
                if missing is None:
                    yield sample
                else:
                    self.fail(sample, *missing, retried=False)
                continue
            self._tick()

    def settle(self, sample: Sample, answer: str, finish_reason: str | None, *, last_try: bool, retried: bool) -> bool:
        """Judge an answer: write it if it passes, record a failure if it fails on the last try.

        Returns whether the sample is finished (False: the caller should ask once more).
        """
        verdict = self.task.judge(answer, sample, finish_reason)
        if verdict.ok:
            self.accept(sample, verdict.result, retried)
            return True
        if last_try:
            self.fail(sample, verdict.reason or "rejected", verdict.detail, retried)
            return True
        log.debug("key %r: answer rejected (%s: %s); asking again", sample.key, verdict.reason, verdict.detail)
        return False

    def accept(self, sample: Sample, value: object, retried: bool) -> None:
        if sample.key in self._done:
            raise RuntimeError(f"key {sample.key!r} would be written twice to {self.cfg.out}")
        self._out.write(
            {"key": sample.key, self.task.field: value, "model": self.model, "prompt_version": self.task.version}
        )
        self._done.add(sample.key)
        self.stats.done += 1
        self.stats.retried += int(retried)
        self._tick()

    def fail(self, sample: Sample, reason: str, detail: str, retried: bool) -> None:
        self._failures.write(
            {"key": sample.key, "reason": reason, "detail": detail, "model": self.model,
             "prompt_version": self.task.version}
        )  # fmt: skip
        self.stats.failed[reason] += 1
        self.stats.retried += int(retried)
        self._tick()

    def _tick(self, final: bool = False) -> None:
        if not final:
            self._bar.update(1)
        now = time.monotonic()
        if final or now - self._last_postfix >= 0.5:
            self._last_postfix = now
            rate = self.stats.done / max(now - self._started, 1e-9)
            self._bar.set_postfix(
                {self.task.rate_label: f"{rate:.1f}", "done": self.stats.done,
                 "failed": sum(self.stats.failed.values())},
                refresh=False,
            )

    def close(self) -> None:
        self._tick(final=True)
        self._bar.close()
        self._out.close()
        self._failures.close()
