"""The run's own state, beside the model and optimizer (DeepSpeed's) and the data loader (Streaming's).

One object with ``state_dict()`` / ``load_state_dict()`` that the checkpoint manager saves on every
rank, as torchtitan hands its checkpointer Stateful objects: adding a counter here is all it takes
for it to be checkpointed and resumed, with no key list kept in step elsewhere.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.training import rng

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed (skipped non-finite steps count: the schedule moves on)."""
    samples: int = 0
    """Training samples consumed over all ranks."""
    nonfinite_in_a_row: int = 0
    """Consecutive steps whose loss was not finite on some rank (the run stops at the recipe's limit)."""
    samples_masked: int = 0
    """Stand-ins for undecodable samples that the loss left out, over all ranks."""
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    """In-loop evaluation results by step (the key is the step, as a string)."""
    last_finite_loss: float = math.nan
    """Loss of the newest step whose loss was finite (``final_loss`` in ``metrics.json``)."""
    wandb_run_id: str = ""
    """Rank 0's wandb run (``logging.wandb``), continued by a resumed run; empty without one."""

    def advance(self, loss: float, finite: bool, samples: int, masked: int) -> None:
        """Count one optimizer step that consumed ``samples`` (``masked`` of them stand-ins)."""
        self.step += 1
        self.samples += samples
        self.samples_masked += masked
        if finite:
            self.nonfinite_in_a_row, self.last_finite_loss = 0, loss
        else:
            self.nonfinite_in_a_row += 1

    def state_dict(self) -> dict[str, Any]:
        """Counters plus this rank's random generators (each rank saves its own)."""
        return {"step": self.step, "samples": self.samples, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "samples_masked": self.samples_masked, "last_finite_loss": self.last_finite_loss,
                "wandb_run_id": self.wandb_run_id,
                "evals": {k: dict(v) for k, v in self.evals.items()}, "rank": collectives.rank(),
                "rng": rng.capture()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        # Absent from checkpoints written before stand-ins were masked.
        self.samples_masked = int(state.get("samples_masked", 0))
        # Absent from checkpoints written before it was run state (a resumed run then reports the loss
        # of its own first finite step, as it did before).
        self.last_finite_loss = float(state.get("last_finite_loss", math.nan))
        self.evals = {k: dict(v) for k, v in state["evals"].items()}
        self.wandb_run_id = str(state.get("wandb_run_id", ""))  # absent before logging.wandb existed
        if state["rank"] == collectives.rank():
            rng.restore(state["rng"])
        else:
            # A rank the saved run did not have (world size grew) must not copy another rank's
            # streams: its stochastic-depth masks would repeat that rank's.
            log.warning("rank %d resumes from rank %d's counters; its random streams restart from the seed",
                        collectives.rank(), state["rank"])
