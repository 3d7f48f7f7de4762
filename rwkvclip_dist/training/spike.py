"""``train.spike``: detect a loss spike, rewind to the checkpoint before it, skip the data that led to it.

A step spikes when its loss is non-finite or above ``factor`` x the median of the last ``window``
finite losses (once ``window`` of them are known). After ``patience`` spiking steps in a row the
trainer reloads the newest complete checkpoint saved before the first of them (model, optimizer,
loader position, RNGs, EMA), then draws and discards the batches it had trained on since that
checkpoint, so the data window that preceded the spike is skipped, not replayed. Every rewind is an
event in the log and in ``metrics.json`` (``rewinds``: step, loss, checkpoint, batches and samples
skipped); after ``max_rewinds`` the run stops with one line. The events and the loss history are
checkpointed (a Stateful), so a resumed run detects and reports as the uninterrupted one.

``inject_lr_scale_at_step`` is the deterministic spike of the tests: the lr of that one step is
multiplied by ``inject_lr_scale``, only while no rewind has happened (the rewound run then passes it).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from rwkvclip_dist.typed_config import FieldError


class TooManyRewindsError(RuntimeError):
    """The loss spiked again after ``train.spike.max_rewinds`` rewinds."""


@dataclass
class SpikeSection:
    """The ``train.spike:`` section of a recipe."""

    enabled: bool = False
    factor: float = 3.0
    """A loss above factor x the median of the recent window spikes."""
    window: int = 20
    """Finite losses the median is taken over (no detection before this many are known)."""
    patience: int = 1
    """Spiking steps in a row (non-finite ones included) before a rewind."""
    max_rewinds: int = 3
    inject_lr_scale_at_step: int = 0
    """Tests: scale the lr of this optimizer step (1-based; 0: never) by inject_lr_scale."""
    inject_lr_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise FieldError("factor", f"must be > 1, got {self.factor}")
        for name in ("window", "patience"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_rewinds < 0 or self.inject_lr_scale_at_step < 0:
            raise FieldError("max_rewinds", "max_rewinds and inject_lr_scale_at_step must be >= 0")


@dataclass
class SpikeDetector:
    """The detection state of a run; a Stateful for the checkpoint manager."""

    section: SpikeSection
    history: list[float] = field(default_factory=list)
    spiking: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of the current run of spiking steps."""
    events: list[dict[str, Any]] = field(default_factory=list)

    def lr_scale(self, step: int) -> float:
        """The injected lr factor for optimizer step ``step`` (1-based)."""
        inject = self.section.inject_lr_scale_at_step
        return self.section.inject_lr_scale if inject == step and not self.events else 1.0

    def observe(self, step: int, loss: float, finite: bool) -> bool:
        """Record step ``step``'s loss; True when the run must rewind now. ``loss`` is the all-rank
        mean, so every rank decides the same and enters the (collective) rewind together."""
        window = self.history[-self.section.window:]
        spike = not finite or (len(window) == self.section.window
                               and loss > self.section.factor * statistics.median(window))
        if not spike:
            self.spiking = []
            self.history = (self.history + [loss])[-self.section.window:]
            return False
        self.spiking.append((step, loss))
        return len(self.spiking) >= self.section.patience

    def first_spike_step(self) -> int:
        return self.spiking[0][0]

    def record_rewind(self, event: dict[str, Any]) -> None:
        """After the checkpoint was loaded (which restored the older detection state)."""
        if len(self.events) >= self.section.max_rewinds:
            raise TooManyRewindsError(
                f"loss spike at step {event['step']} (loss {event['loss']:.4g}) after {len(self.events)} rewinds "
                f"(train.spike.max_rewinds={self.section.max_rewinds}): stopping; lower optimizer.lr, check the "
                f"data around samples {event['samples_skipped_from']}-, or raise train.spike.factor")
        self.events.append(event)
        self.spiking = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "spiking": [list(s) for s in self.spiking],
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(x) for x in state["history"]]
        self.spiking = [(int(s), float(v)) for s, v in state["spiking"]]
        self.events = [dict(e) for e in state["events"]]


def rewind(trainer, logger) -> int:
    """Reload the newest complete checkpoint saved before the spike into ``trainer`` (a
    ``training.loop.Trainer``, collective); returns how many batches to draw and discard."""
    detector: SpikeDetector = trainer.spikes
    first = detector.first_spike_step()
    step, loss = detector.spiking[-1]
    manager = trainer.parts.checkpoints
    tags = [t for t in manager.complete_tags() if int(t.rsplit("_", 1)[1]) < first]
    if not tags:
        raise TooManyRewindsError(f"loss spike at step {step} (loss {loss:.4g}) and no complete checkpoint before "
                                  f"step {first} to rewind to; lower optimizer.lr or save checkpoints more often")
    tag = tags[-1]
    saved_step = int(tag.rsplit("_", 1)[1])
    global_batch = trainer.parts.global_batch
    event = {"step": step, "loss": loss, "first_spike_step": first, "checkpoint": tag,
             "batches_skipped": step - saved_step, "samples_skipped_from": saved_step * global_batch,
             "samples_skipped": (step - saved_step) * global_batch}
    events = list(detector.events)
    if len(events) >= detector.section.max_rewinds:
        detector.record_rewind(event)  # raises with the message
    manager.load(trainer.parts.engine, trainer._stateful(), tag)  # restores the older detector state too
    detector.events = events
    detector.record_rewind(event)
    logger.message(f"loss spike at step {step} (loss {loss:.4g}): rewound to {tag}, skipping the "
                   f"{event['batches_skipped']} batches ({event['samples_skipped']} samples) since it "
                   f"(rewind {len(detector.events)} of at most {detector.section.max_rewinds})")
    return event["batches_skipped"]
