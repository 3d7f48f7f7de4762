"""Learning-rate schedules as pure functions of the step: lr(step) = peak lr x factor(step).

A pure function (no scheduler object with state) means a resumed run recomputes the exact lr of any
step from the step counter alone, and a skipped step (non-finite loss) does not shift it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rwkvclip_dist.typed_config import FieldError


@dataclass
class ScheduleSection:
    """The ``schedule:`` section of a recipe."""

    kind: Literal["cosine", "onecycle", "constant", "wsd"] = "cosine"
    """'cosine': linear warm-up then cosine to min_lr_ratio; 'onecycle': the paper's alternative;
    'wsd': linear warm-up, a stable peak, then a cool-down to min_lr_ratio (warmup-stable-decay)."""
    warmup_fraction: float = 0.1
    """Fraction of train.steps spent warming up (cosine) or rising (onecycle)."""
    min_lr_ratio: float = 0.0
    """Final lr / peak lr for the cosine schedule."""
    cooldown_fraction: float = 0.2
    """wsd: the cool-down is the last fraction of train.steps (unless cooldown_from says where it starts)."""
    cooldown_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: how the lr falls during the cool-down ('sqrt': 1 - sqrt(t), which keeps more of the
    fall for the end)."""
    cooldown_from: int = 0
    """wsd: the step at which the cool-down starts (0: from cooldown_fraction). The lr of a stable
    run does not depend on where its cool-down will be, so a checkpoint of step S continued with
    ``cooldown_from: S`` (and train.steps = S + cool-down length) cools down from there."""
    onecycle_div_factor: float = 25.0
    """onecycle: the start lr is lr / div_factor."""
    onecycle_final_div_factor: float = 1e4
    """onecycle: the final lr is start lr / final_div_factor."""

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction <= 1:
            raise FieldError("warmup_fraction", f"must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise FieldError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.cooldown_fraction <= 1:
            raise FieldError("cooldown_fraction", f"must be in [0, 1], got {self.cooldown_fraction}")
        if self.cooldown_from < 0:
            raise FieldError("cooldown_from", f"must be >= 0, got {self.cooldown_from}")
        for name in ("onecycle_div_factor", "onecycle_final_div_factor"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Schedule:
    kind: str
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cooldown_start: int = 0
    """wsd: first step of the cool-down."""
    cooldown_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warm-up of {self.warmup_steps} steps does not fit in {self.total_steps} steps")
        if self.kind == "wsd" and not self.warmup_steps <= self.cooldown_start <= self.total_steps:
            raise ValueError(f"schedule.cooldown_from: the cool-down start {self.cooldown_start} must lie between the "
                             f"end of the warm-up ({self.warmup_steps}) and train.steps ({self.total_steps})")

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            return self._wsd(step)
        return self._onecycle(step)

    def _wsd(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step < self.cooldown_start:
            return 1.0
        # The cool-down's last step reaches min_lr_ratio exactly.
        t = min(1.0, (step - self.cooldown_start + 1) / max(1, self.total_steps - self.cooldown_start))
        fall = {"linear": t, "sqrt": math.sqrt(t), "cosine": 0.5 * (1 - math.cos(math.pi * t))}[self.cooldown_shape]
        return 1.0 - (1.0 - self.min_lr_ratio) * fall

    def _onecycle(self, step: int) -> float:
        # Cosine annealing both ways (torch's OneCycleLR with anneal_strategy='cos'):
        # peak/div_factor -> peak over the warm-up, then -> peak/(div_factor*final_div_factor).
        start = 1.0 / self.div_factor
        end = start / self.final_div_factor
        if step < self.warmup_steps:
            t = step / max(1, self.warmup_steps)
            return _cos_interp(start, 1.0, t)
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return _cos_interp(1.0, end, min(1.0, t))


def _cos_interp(begin: float, end: float, t: float) -> float:
    return end + (begin - end) * 0.5 * (1 + math.cos(math.pi * t))


def build_schedule(section: ScheduleSection, total_steps: int) -> Schedule:
    cooldown = section.cooldown_from or total_steps - int(round(section.cooldown_fraction * total_steps))
    return Schedule(section.kind, total_steps, int(round(section.warmup_fraction * total_steps)),
                    section.min_lr_ratio, section.onecycle_div_factor, section.onecycle_final_div_factor,
                    cooldown, section.cooldown_shape)


def set_lr(optimizer, base_lrs: list[float], factor: float) -> float:
    """Set every param group's lr to its base lr times ``factor``; returns the largest (the peak lr's
    share: layer decay and group rules give other groups less)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
    return max(base_lrs) * factor
