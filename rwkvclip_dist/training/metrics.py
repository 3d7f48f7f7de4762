"""What a run reports while it trains: TensorBoard scalars, a progress bar with ETA, a summary line
every N steps, and a per-step loss log (``loss_log.jsonl``) that tests and golden curves read.

Only rank 0 writes; other ranks keep the same object so the call sites need no rank checks.
Throughput figures are averaged over the window since the previous summary line.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rwkvclip_dist.outputs import strict_json
from rwkvclip_dist.training.wandb_log import WandbSection, open_wandb_run
from rwkvclip_dist.typed_config import FieldError

log = logging.getLogger("rwkvclip_dist.training")


@dataclass
class LoggingSection:
    """The ``logging:`` section of a recipe."""

    every_steps: int = 10
    """A readable summary line (and the TensorBoard scalars) every N steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0 (on stderr)."""
    peak_flops_per_device: float = 0.0
    """Peak dense FLOP/s of one device for the MFU estimate; 0 picks a known value or disables MFU."""
    wandb: WandbSection = field(default_factory=WandbSection)
    """Weights & Biases beside TensorBoard (``training/wandb_log.py``)."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise FieldError("every_steps", f"must be >= 1, got {self.every_steps}")
        if self.peak_flops_per_device < 0:
            raise FieldError("peak_flops_per_device", f"must be >= 0, got {self.peak_flops_per_device}")

# Dense bf16 peak FLOP/s of common accelerators, for the MFU estimate when the recipe gives none.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12, "V100": 125e12}


def detect_peak_flops() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return 0.0


class TrainLogger:
    def __init__(self, section: LoggingSection, run_dir: Path, *, is_main: bool, total_steps: int, start_step: int,
                 world_size: int, flops_per_sample: float, tokens_per_sample: int, run_state=None,
                 recipe_plain: dict | None = None) -> None:
        """``run_state`` (``TrainState``) holds the wandb run id and ``recipe_plain`` is the config
        wandb records, both only read with ``logging.wandb``."""
        self.is_main = is_main
        self.every = section.every_steps
        self.world_size = world_size
        self.train_flops_per_sample = 3.0 * flops_per_sample  # forward + backward (2x forward)
        self.tokens_per_sample = tokens_per_sample
        self.peak_flops = section.peak_flops_per_device or detect_peak_flops()
        self.total_steps = total_steps
        self.writer = None
        self.wandb_run = open_wandb_run(section.wandb, run_dir, run_state, recipe_plain or {}, is_main)
        self.bar = None
        self.loss_log = None
        self._reset_window()
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.loss_log = open(run_dir / "loss_log.jsonl", "a")
        if section.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if section.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def _reset_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_samples = 0
        self._window_data_wait = 0.0
        self._window_losses: list[float] = []

    def log_step(self, step: int, *, loss: float, lr: float, logit_scale: float, grad_norm: float | None,
                 global_samples: int, data_wait: float, skipped: bool, masked: int = 0) -> dict[str, float] | None:
        """Record one optimizer step (``step`` counts completed steps, from 1); every ``every``
        steps, emit the window's averages. Returns those averages when it emitted them."""
        self._window_samples += global_samples
        self._window_data_wait += data_wait
        if math.isfinite(loss):
            self._window_losses.append(loss)
        if not self.is_main:
            if step % self.every == 0:
                self._reset_window()
            return None
        record = {"step": step, "loss": loss, "lr": lr, "logit_scale": logit_scale, "grad_norm": grad_norm,
                  "skipped": skipped}
        if masked:
            record["masked"] = masked  # stand-ins for undecodable samples, left out of the loss
        self.loss_log.write(strict_json(record) + "\n")  # a non-finite loss is null: still JSON
        self.loss_log.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % self.every and step != self.total_steps:
            return None
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        samples_per_s = self._window_samples / elapsed
        scalars = {
            "train/loss": sum(self._window_losses) / max(1, len(self._window_losses)),
            "train/lr": lr,
            "train/logit_scale": logit_scale,
            "perf/samples_per_s": samples_per_s,
            "perf/tokens_per_s": samples_per_s * self.tokens_per_sample,
            "perf/data_wait_fraction": min(1.0, self._window_data_wait / elapsed),
        }
        if grad_norm is not None and math.isfinite(grad_norm):
            scalars["train/grad_norm"] = grad_norm
        if self.peak_flops > 0:
            scalars["perf/mfu"] = samples_per_s * self.train_flops_per_sample / (self.peak_flops * self.world_size)
        self.write_scalars(step, scalars)
        mfu = f" mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
        gnorm = f" gnorm {grad_norm:.3f}" if grad_norm is not None else ""
        # The line's loss is the window's mean; loss_log.jsonl has each step's own, so the line says which.
        n = len(self._window_losses)
        what = "loss" if n == 1 else f"loss (mean of the last {n} steps)" if n else "loss (no finite step)"
        self.message(f"step {step}/{self.total_steps} {what} {scalars['train/loss']:.4f} lr {lr:.3g} "
                     f"scale {logit_scale:.2f}{gnorm} | {samples_per_s:.1f} samples/s "
                     f"data wait {scalars['perf/data_wait_fraction']:.0%}{mfu}")
        self._reset_window()
        return scalars

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in scalars.items() if v is not None}, step=step)
        if self.writer is not None:
            for key, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def record_bi_wkv(self, step: int, report: dict) -> None:
        """The Bi-WKV path chosen and its self-tests (``ops.report()``), as text and one scalar per
        self-test (1 passed, 0 refused), so that a run on a refused kernel says so in TensorBoard."""
        if self.writer is None:
            return
        self.writer.add_text("bi_wkv", strict_json(report, indent=1), step)
        for key, outcome in report["self_test"].items():
            self.writer.add_scalar(f"bi_wkv/self_test_passed/{key.replace(' ', '_')}", float(outcome["passed"]), step)
        self.writer.flush()

    def message(self, text: str) -> None:
        """A line on the console (rank 0), above the progress bar when there is one."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.loss_log is not None:
            self.loss_log.close()
