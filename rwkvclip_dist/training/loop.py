"""The training loop. :func:`start_run` checks, sets up and builds a run; :class:`Trainer` runs it to
``metrics.json``.

The loop is a short ``while``: fetch a batch, train one step (forward, contrastive loss, backward and
the optimizer step), record it (``TrainState.advance``, the non-finite limit, logging), evaluate when
due, vote on stopping, and hand the checkpoint manager the step (it decides whether to save: its
interval, the last step, or a stop). It holds no run state of its own: what a restart must remember
lives in :class:`TrainState`, which the manager saves beside the data loader's state.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rwkvclip_dist import ops
from rwkvclip_dist.checkpoint.manager import CheckpointManager
from rwkvclip_dist.checkpoint.record import RunRecord, installed_versions
from rwkvclip_dist.checkpoint.reshard import Topology
from rwkvclip_dist.data.remote_check import check_s3_streams
from rwkvclip_dist.data.dataset import STAND_IN
from rwkvclip_dist.eval.distributed import sharded_over
from rwkvclip_dist.model.flops import forward_flops_per_sample
from rwkvclip_dist.model.registry import get_model_config
from rwkvclip_dist.outputs import write_json
from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.parallel.engine import clamp_parameter_, init_distributed
from rwkvclip_dist.parallel.groups import check_world_size
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.training.accumulation import contrastive_step, split_micro_batches
from rwkvclip_dist.training.components import (Components, build_components, check_run_directory,
                                               checkpoint_directory)
from rwkvclip_dist.training.ema import ShardedEma, evaluated_weights
from rwkvclip_dist.training.evals import ZeroShotTask, open_evaluations
from rwkvclip_dist.training.init_from import prepare_init_from
from rwkvclip_dist.training.suite_evals import open_suite_evaluations
from rwkvclip_dist.training.metrics import TrainLogger
from rwkvclip_dist.training.ownership import LauncherWatch, run_directories_locked
from rwkvclip_dist.training.preemption import PreemptionHandler
from rwkvclip_dist.training.recipe import Recipe, save_recipe
from rwkvclip_dist.training.provenance import write_provenance
from rwkvclip_dist.training.schedule import set_lr
from rwkvclip_dist.training.spike import SpikeDetector, rewind
from rwkvclip_dist.training.state import TrainState
from rwkvclip_dist.typed_config import to_plain

MAX_LOGIT_SCALE = math.log(100.0)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


@dataclass
class StepResult:
    loss: float  # mean over ranks of the step's loss
    masked: int
    """Stand-ins for undecodable samples left out of the loss, over all ranks."""
    lr: float
    finite: bool
    logit_scale: float
    grad_norm: float | None


def setup_process(launch: LaunchEnv) -> torch.device:
    """Logging, warnings and the device of this rank."""
    # DeepSpeed's ZeRO calls a torch collective that torch has deprecated, once per step per rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {launch.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    if torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank)
    # Ranks sharing a CPU split its cores instead of each spawning one thread per core; the cores this
    # process may run on (a Slurm allocation, a container, taskset), not all of the machine's.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // launch.local_world_size))
    return torch.device("cpu")


def start_run(recipe: Recipe, run_dir: Path, launch: LaunchEnv) -> "Trainer":
    """Check, set up and build everything a run needs, in an order where a mistake stops every rank
    before anything is written: then lock the run's directories, save the recipe, build the parts."""
    # First: the parent that launched this rank, before it has any chance to die unnoticed.
    watch = LauncherWatch(launch.launcher)
    check_world_size(recipe.parallel.tensor_parallel, launch.world_size)
    model_config = to_plain(get_model_config(recipe.model.name, **recipe.model.overrides))
    checkpoint_dir = checkpoint_directory(recipe, run_dir)
    if recipe.checkpoint.resume:  # before any engine: another model would be trained on these weights
        CheckpointManager(checkpoint_dir).check_resumable(recipe.parallel.tensor_parallel, model_config, recipe.model.name,
                                                         recipe.model.overrides, remote=recipe.checkpoint.remote)
    check_run_directory(recipe, run_dir)  # refused or finished: before anything is written
    check_s3_streams(recipe.data.streams)
    device = setup_process(launch)
    # model.init_from, evaluation data and class names are read before any process group starts: a
    # mistake there stops every rank at once with its message, not after the engine is built.
    initial = prepare_init_from(recipe.model, recipe.checkpoint.resume, checkpoint_dir)
    evals = open_evaluations(recipe.eval.zeroshot, recipe.model.name, recipe.model.overrides, device)
    evals += open_suite_evaluations(recipe.eval.suite, recipe.model.name, recipe.model.overrides, device)
    init_distributed(launch, recipe.parallel.backend, recipe.parallel.timeout_s)
    held = contextlib.ExitStack()
    try:
        held.enter_context(run_directories_locked([run_dir, checkpoint_dir], launch.rank == 0))
        if launch.rank == 0:
            save_recipe(recipe, run_dir / "recipe.yaml")
            write_provenance(run_dir, launch, recipe.parallel.tensor_parallel)
        collectives.barrier()
        parts = build_components(recipe, run_dir, launch, device, evals, initial)
    except BaseException:
        held.close()
        raise
    record = RunRecord(step=0, world_size=launch.world_size, tensor_parallel=recipe.parallel.tensor_parallel,
                       recipe=to_plain(recipe), model=model_config, versions=installed_versions())
    return Trainer(recipe, run_dir, launch, parts, record, watch, held)


class Trainer:
    """One run's loop over built parts; :meth:`run` releases what the run holds (``held``) as it ends."""

    def __init__(self, recipe: Recipe, run_dir: Path, launch: LaunchEnv, parts: Components, record: RunRecord,
                 watch: LauncherWatch, held: contextlib.ExitStack | None = None) -> None:
        self.recipe, self.run_dir, self.launch, self.parts = recipe, run_dir, launch, parts
        self.record, self.watch, self.held = record, watch, held or contextlib.ExitStack()
        self.is_main = launch.rank == 0
        self.state = TrainState()
        self.last_progress = time.monotonic()
        """When this rank last finished a step (how long a survivor waited for a lost peer)."""
        self.ema = ShardedEma(recipe.train.ema, parts.engine) if recipe.train.ema.enabled else None
        self.spikes = SpikeDetector(recipe.train.spike) if recipe.train.spike.enabled else None

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        with self.held:
            self._resume()
            start_step, steps = self.state.step, self.recipe.train.steps
            logger = self._open_logger(start_step)
            preemption = PreemptionHandler().install()
            status, started, stop = "completed", time.perf_counter(), False
            try:
                batches = self._batches()
                while self.state.step < steps and not stop:
                    (images, tokens, text_ids), data_wait = next(batches)
                    result = self._train_step(images, tokens, text_ids)
                    self._record_step(result, data_wait, logger)
                    if self.spikes is not None and self.spikes.observe(self.state.step, result.loss, result.finite):
                        batches = self._batches(skip=rewind(self, logger))  # training/spike.py
                        continue
                    self._evaluate_if_due(logger)
                    self.last_progress = time.monotonic()
                    stop = preemption.should_stop(also=self.watch.launcher_gone())
                    self.parts.checkpoints.save_if_due(self.parts.engine, self._stateful(),
                                                       replace(self.record, step=self.state.step), force=stop)
                if stop:
                    status = self._stop_reason(logger)
                else:
                    self._final_evaluation(logger)
                metrics = self._write_metrics(status, start_step, time.perf_counter() - started)
            finally:
                preemption.uninstall()
                self.parts.checkpoints.close()
                logger.close()
        return metrics

    def _stop_reason(self, logger: TrainLogger) -> str:
        if self.watch.launcher_gone():
            logger.message(f"the launcher of this rank (pid {self.watch.parent}) is gone: saved "
                           f"step {self.state.step}, stopping rather than training on as an orphan")
            return "launcher_lost"
        logger.message(f"stop signal received: saved step {self.state.step}, exiting")
        return "preempted"

    # -- its steps -----------------------------------------------------------------------------
    def _batches(self, skip: int = 0):
        """Endless ``((images, tokens), seconds waited)`` after ``skip`` batches drawn and dropped (the
        window a loss-spike rewind skips); Streaming moves on to the next epoch."""
        while True:
            iterator = iter(self.parts.loader)
            while True:
                wait_start = time.perf_counter()
                batch = next(iterator, None)
                if batch is None:
                    break
                if skip:
                    skip -= 1
                    continue
                yield batch[:3], time.perf_counter() - wait_start

    def _train_step(self, images: torch.Tensor, tokens: torch.Tensor, text_ids: torch.Tensor) -> StepResult:
        parts, engine = self.parts, self.parts.engine
        micro = split_micro_batches(images.to(parts.device, parts.dtype), tokens.to(parts.device),
                                    self.recipe.train.accumulation_steps)
        factor = parts.schedule.factor(self.state.step)
        if self.spikes is not None:
            factor *= self.spikes.lr_scale(self.state.step + 1)  # the tests' deterministic spike
        lr = set_lr(engine.optimizer, parts.base_lrs, factor)
        valid = (text_ids != STAND_IN).to(parts.device)
        out = contrastive_step(engine, parts.loss_fn, self._backward_and_step, micro, valid)
        grad_norm = None
        if out.finite:
            clamp_parameter_(engine, engine.module.logit_scale, 0.0, MAX_LOGIT_SCALE)
            if self.ema is not None:
                self.ema.after_step(self.state.step + 1)
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        loss_sum, masked = collectives.all_reduce_sum([out.loss, int((~valid).sum())])
        # The ranks of a tensor-parallel group hold the same samples: each is counted once.
        return StepResult(loss_sum / self.launch.world_size, round(masked / parts.groups.tensor_parallel), lr,
                          out.finite, out.logit_scale, grad_norm)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        # Every micro-batch's loss is the whole step's loss (training.accumulation): no 1/K. The
        # engine applies the optimizer only at the last micro-batch of a step.
        self.parts.engine.backward(loss, scale_wrt_gas=False)
        self.parts.engine.step()

    def _record_step(self, result: StepResult, data_wait: float, logger: TrainLogger) -> None:
        state, limit = self.state, self.recipe.train.max_nonfinite_steps
        state.advance(result.loss, result.finite, self.parts.global_batch, result.masked)
        if not result.finite:
            logger.message(f"step {state.step}: non-finite loss ({result.loss}), step skipped "
                           f"({state.nonfinite_in_a_row} in a row, limit {limit})")
        logger.log_step(state.step, loss=result.loss, lr=result.lr, logit_scale=result.logit_scale,
                        grad_norm=result.grad_norm, global_samples=self.parts.global_batch, data_wait=data_wait,
                        skipped=not result.finite, masked=result.masked)
        if state.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"stopping: the loss was non-finite for {limit} steps in a row (steps "
                f"{state.step - limit + 1}-{state.step}); lower optimizer.lr, check the data, or raise "
                f"train.max_nonfinite_steps. The last checkpoint is still intact.")

    def _evaluate_if_due(self, logger: TrainLogger) -> None:
        due = [task for task in self.parts.evals if task.due(self.state.step)]
        if due:
            self._evaluate(due, logger)

    def _final_evaluation(self, logger: TrainLogger) -> None:
        if self.recipe.eval.at_end and self.parts.evals and str(self.state.step) not in self.state.evals:
            self._evaluate(self.parts.evals, logger)

    def _evaluate(self, tasks: list[ZeroShotTask], logger: TrainLogger) -> None:
        use_ema = self.recipe.eval.use_ema
        # The ranks of a tensor-parallel group run each forward together on the same images.
        with evaluated_weights(self.ema if use_ema else None), sharded_over(self.parts.groups.dp_group):
            results = {key: value for task in tasks for key, value in task.run(self.parts.engine.module).items()}
        self.state.evals[str(self.state.step)] = results
        logger.write_scalars(self.state.step, {f"eval/{k}": v for k, v in results.items()})
        logger.message(f"eval at step {self.state.step}{' (EMA)' * use_ema}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    # -- around the loop -----------------------------------------------------------------------
    def _stateful(self) -> dict:
        states = {"train_state": self.state, "loader": self.parts.loader}
        # the EMA and the spike detector are checkpointed when the recipe enables them
        states.update({name: obj for name, obj in (("ema", self.ema), ("spike", self.spikes)) if obj is not None})
        return states

    def _resume(self) -> None:
        if self.recipe.checkpoint.resume:
            self.parts.checkpoints.load(self.parts.engine, self._stateful(), topology=Topology(
                self.launch.world_size, self.recipe.parallel.tensor_parallel, self.parts.global_batch))

    def _open_logger(self, start_step: int) -> TrainLogger:
        recipe, cfg = self.recipe, self.parts.model_config
        logger = TrainLogger(recipe.logging, self.run_dir, is_main=self.is_main, total_steps=recipe.train.steps,
                             start_step=start_step, world_size=self.launch.world_size,
                             flops_per_sample=forward_flops_per_sample(cfg),
                             tokens_per_sample=cfg.image.num_patches + cfg.text.context_length,
                             run_state=self.state, recipe_plain=to_plain(recipe))
        groups = self.parts.groups
        logger.message(f"training {cfg.name} on {self.launch.world_size} rank(s) (tensor parallel "
                       f"{groups.tensor_parallel} x data parallel {groups.dp_size}), global batch "
                       f"{self.parts.global_batch}, steps {start_step} -> {recipe.train.steps}, "
                       f"ZeRO-{recipe.parallel.zero_stage} {recipe.parallel.precision}")
        logger.record_bi_wkv(start_step, ops.report())
        return logger

    def _write_metrics(self, status: str, start_step: int, elapsed: float) -> dict:
        state, global_batch = self.state, self.parts.global_batch
        # Every rank of a node reads the same node-wide counter: the sum over ranks counts each node
        # local_world_size times; the ranks of a tensor-parallel group decode the same samples.
        corrupt = (collectives.all_reduce_mean(self.parts.dataset.num_corrupt) * self.launch.world_size
                   / self.parts.groups.tensor_parallel)
        metrics = {
            "status": status, "steps": state.step, "samples": state.samples, "final_loss": state.last_finite_loss,
            "samples_per_s": (state.step - start_step) * global_batch / max(elapsed, 1e-9),
            "wall_time_s": elapsed, "resumed_from_step": start_step, "world_size": self.launch.world_size,
            "corrupt_samples_replaced": round(corrupt / self.launch.local_world_size),
            "bi_wkv_calls": ops.dispatch_counts(), "bi_wkv": ops.report(), "samples_masked": state.samples_masked,
            "evals": state.evals, "rewinds": self.spikes.events if self.spikes is not None else [],
        }
        if state.evals:
            metrics.update(state.evals[max(state.evals, key=int)])
        if self.is_main:
            write_json(self.run_dir / "metrics.json", metrics)  # strict: a NaN final_loss is null
        collectives.barrier()
        return metrics
