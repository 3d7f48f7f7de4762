"""``train.ema``: an exponential moving average of the weights, kept where ZeRO keeps the fp32 master.

The EMA is one fp32 tensor per optimizer group on each rank, shaped like that rank's partition of the
optimizer's flat fp32 master weights (ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3
``fp32_partitioned_groups_flat``): no rank ever holds a full copy, and the update is one elementwise
``ema = d * ema + (1 - d) * master`` per partition after every ``every_steps``-th optimizer step that
was taken (a skipped non-finite step does not count). It starts as the master weights after the
first such step. With ``warmup`` the decay of update ``n`` (1-based) is ``min(decay, (1 + n) / (10 + n))``
(timm's ModelEmaV2 warm-up), so an early average is not dominated by the random initialisation.

Each rank saves its partitions with its train state (``checkpoint/manager.py`` rank files) and a
resumed run continues them exactly (same world size and ZeRO stage: the partitions are the
optimizer's). ``tools/convert_checkpoint.py from-zero --ema`` consolidates them into one file with
DeepSpeed's own merging of fp32 partitions (``convert/zero.py``; under tensor parallelism per TP rank,
then the TP shards merged as the weights are).

``eval.use_ema`` evaluates the EMA in the loop (:meth:`ShardedEma.swapped_in`): each rank copies its
EMA partitions into the optimizer's master partitions (after saving those) and DeepSpeed's
``update_lp_params`` writes them into the model's weights (the all-gather an optimizer step ends with);
afterwards the saved master partitions go back the same way. The model weights are always the cast of
the master, so training continues bitwise as without the evaluation. The cost is one partition-sized
copy per rank and two all-gathers of the weights, no full fp32 copy anywhere. ZeRO-1/2 only: ZeRO-3's
optimizer has no such method (refused at load, ``training/recipe.py``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from rwkvclip_dist.typed_config import FieldError

log = logging.getLogger(__name__)


@dataclass
class EmaSection:
    """The ``train.ema:`` section of a recipe."""

    enabled: bool = False
    decay: float = 0.9999
    every_steps: int = 1
    """Update every N optimizer steps (each update uses ``decay``)."""
    warmup: bool = True
    """Decay of update n is min(decay, (1 + n) / (10 + n))."""

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise FieldError("decay", f"must be in (0, 1), got {self.decay}")
        if self.every_steps < 1:
            raise FieldError("every_steps", f"must be >= 1, got {self.every_steps}")


def decay_of_update(section: EmaSection, n: int) -> float:
    """The decay used by update ``n`` (1-based)."""
    return min(section.decay, (1 + n) / (10 + n)) if section.warmup else section.decay


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master-weight partitions, one per optimizer group."""
    optimizer = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(optimizer, name, None)
        if groups is not None:
            return list(groups)
    raise RuntimeError(f"train.ema: the optimizer {type(optimizer).__name__} keeps no partitioned fp32 master "
                       f"weights (train.ema needs parallel.zero_stage >= 1)")


class ShardedEma:
    """The EMA of this rank's master partitions; a Stateful for the checkpoint manager."""

    def __init__(self, section: EmaSection, engine) -> None:
        self.section, self.engine = section, engine
        self.updates = 0
        self.partitions: list[torch.Tensor] = []

    def after_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) was taken."""
        if step % self.section.every_steps:
            return
        masters = master_partitions(self.engine)
        self.updates += 1
        with torch.no_grad():
            if not self.partitions:
                self.partitions = [m.detach().float().clone() for m in masters]
                return
            d = decay_of_update(self.section, self.updates)
            for ema, master in zip(self.partitions, masters):
                ema.mul_(d).add_(master.detach().float(), alpha=1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model's weights are the EMA inside the block and the trained weights again after it
        (every rank enters together: it all-gathers). Before the first update the EMA is, by its
        definition, the current weights: nothing is swapped."""
        if not self.partitions:
            yield
            return
        optimizer = self.engine.optimizer
        masters = master_partitions(self.engine)
        with torch.no_grad():
            saved = [m.detach().clone() for m in masters]
            for master, ema in zip(masters, self.partitions):
                master.copy_(ema)
            optimizer.update_lp_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for master, kept in zip(masters, saved):
                    master.copy_(kept)
                optimizer.update_lp_params()

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "partitions": [p.cpu() for p in self.partitions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masters = master_partitions(self.engine)
        shapes = [tuple(m.shape) for m in masters]
        saved = [tuple(p.shape) for p in state["partitions"]]
        if state["partitions"] and saved != shapes:
            raise ValueError(f"train.ema: the checkpoint's EMA partitions {saved} do not match this run's "
                             f"optimizer partitions {shapes} (another world size or ZeRO stage)")
        self.updates = state["updates"]
        self.partitions = [p.to(m.device, torch.float32).clone() for p, m in zip(state["partitions"], masters)]


def evaluated_weights(ema: ShardedEma | None):
    """The block in which the loop's evaluations run: on the EMA (``eval.use_ema``) or, with None, on
    the trained weights as they are."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()
