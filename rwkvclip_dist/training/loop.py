"""The training loop: a :class:`Trainer` owns one run, from process setup to ``metrics.json``.

Each concern of a step is one short method: fetch a batch, train one step (forward, contrastive
loss, backward and the optimizer step), record it (counters, the non-finite policy, logging),
evaluate when due, checkpoint when due or asked to stop. What the run must remember across a restart
lives in :class:`TrainState`; the checkpoint manager saves it beside the data loader's state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkvclip_dist import ops
from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.training.metrics import TrainLogger
from rwkvclip_dist.training.ownership import LauncherWatch, lock_run_directories
from rwkvclip_dist.training.preemption import PreemptionHandler
from rwkvclip_dist.training.recipe import Recipe, save_recipe
from rwkvclip_dist.training.state import TrainState
from rwkvclip_dist.typed_config import to_plain

MAX_LOGIT_SCALE = math.log(100.0)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


@dataclass
class StepResult:
    loss: float
    """Mean over ranks of the step's loss."""
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


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, launch: LaunchEnv) -> None:
        from rwkvclip_dist.parallel.engine import init_distributed
        from rwkvclip_dist.parallel.groups import check_world_size
        from rwkvclip_dist.training.components import build_components, check_resume_compatible, checkpoint_directory
        from rwkvclip_dist.training.evals import open_evaluations

        # First: the parent that launched this rank, before it has any chance to die unnoticed.
        self.watch = LauncherWatch(launch.launcher)
        self.recipe, self.run_dir, self.launch = recipe, run_dir, launch
        check_world_size(recipe.parallel.tensor_parallel, launch.world_size)
        check_resume_compatible(recipe, run_dir)
        self.device = setup_process(launch)
        # Evaluation data and class names are opened before any process group starts: a mistake there
        # stops every rank at once with its message, not after the engine is built.
        evals = open_evaluations(recipe.eval.zeroshot, recipe.model.name, recipe.model.overrides, self.device)
        init_distributed(launch, recipe.parallel.backend, recipe.parallel.timeout_s)
        self.is_main = launch.rank == 0
        self.last_progress = time.monotonic()
        """When this rank last finished a step (how long a survivor waited for a lost peer)."""
        self.locks = lock_run_directories([run_dir, checkpoint_directory(recipe, run_dir)], self.is_main)
        if self.is_main:
            save_recipe(recipe, run_dir / "recipe.yaml")
        collectives.barrier()
        self.state = TrainState()
        self.parts = build_components(recipe, run_dir, launch, self.device, evals)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        self._resume()
        start_step = self.state.step
        logger = self._open_logger(start_step)
        preemption = PreemptionHandler().install()
        status, started = "completed", time.perf_counter()
        try:
            batches = self._batches()
            while self.state.step < self.recipe.train.steps:
                (images, tokens, text_ids), data_wait = next(batches)
                result = self._train_step(images, tokens, text_ids)
                self._record_step(result, data_wait, logger)
                self._evaluate_if_due(logger)
                self.last_progress = time.monotonic()
                if self._checkpoint_if_due(preemption):
                    if self.watch.launcher_gone():
                        status = "launcher_lost"
                        logger.message(f"the launcher of this rank (pid {self.watch.parent}) is gone: saved "
                                       f"step {self.state.step}, stopping rather than training on as an orphan")
                    else:
                        status = "preempted"
                        logger.message(f"stop signal received: saved step {self.state.step}, exiting")
                    break
            if status == "completed":
                self._final_evaluation(logger)
            metrics = self._write_metrics(status, start_step, time.perf_counter() - started)
        finally:
            preemption.uninstall()
            self.parts.checkpoints.close()
            logger.close()
        for lock in self.locks:
            lock.release()
        return metrics

    # -- its steps -----------------------------------------------------------------------------
    def _batches(self):
        """Endless ``((images, tokens), seconds waited)``; Streaming moves on to the next epoch."""
        while True:
            iterator = iter(self.parts.loader)
            while True:
                wait_start = time.perf_counter()
                batch = next(iterator, None)
                if batch is None:
                    break
                yield batch[:3], time.perf_counter() - wait_start

    def _train_step(self, images: torch.Tensor, tokens: torch.Tensor, text_ids: torch.Tensor) -> StepResult:
        from rwkvclip_dist.data.dataset import STAND_IN
        from rwkvclip_dist.parallel.engine import clamp_parameter_
        from rwkvclip_dist.training.accumulation import contrastive_step, split_micro_batches
        from rwkvclip_dist.training.schedule import set_lr

        parts, engine = self.parts, self.parts.engine
        micro = split_micro_batches(images.to(self.device, parts.dtype), tokens.to(self.device),
                                    self.recipe.train.accumulation_steps)
        lr = set_lr(engine.optimizer, parts.base_lrs, parts.schedule.factor(self.state.step))
        valid = (text_ids != STAND_IN).to(self.device)
        out = contrastive_step(engine, parts.loss_fn, self._backward_and_step, micro, valid)
        grad_norm = None
        if out.finite:
            clamp_parameter_(engine, engine.module.logit_scale, 0.0, MAX_LOGIT_SCALE)
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
        state.step += 1
        state.samples += self.parts.global_batch
        state.samples_masked += result.masked
        if result.finite:
            state.nonfinite_in_a_row, self.last_finite_loss = 0, result.loss
        else:
            state.nonfinite_in_a_row += 1
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

    def _evaluate(self, tasks, logger: TrainLogger) -> None:
        from rwkvclip_dist.eval.distributed import sharded_over

        results: dict[str, float] = {}
        # The ranks of a tensor-parallel group run each forward together on the same images.
        with sharded_over(self.parts.groups.dp_group):
            for task in tasks:
                results.update(task.run(self.parts.engine.module))
        self.state.evals[str(self.state.step)] = results
        logger.write_scalars(self.state.step, {f"eval/{k}": v for k, v in results.items()})
        logger.message(f"eval at step {self.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def _checkpoint_if_due(self, preemption: PreemptionHandler) -> bool:
        """Save when a save is due or a stop was asked for (collective); True means stop now."""
        stop = preemption.should_stop(also=self.watch.launcher_gone())
        step, every = self.state.step, self.recipe.checkpoint.every_steps
        if stop or step == self.recipe.train.steps or (every and step % every == 0):
            record = {"step": step, "world_size": self.launch.world_size,
                      "tensor_parallel": self.recipe.parallel.tensor_parallel, "recipe": to_plain(self.recipe)}
            self.parts.checkpoints.save(self.parts.engine, step, self._stateful(), record)
        return stop

    # -- around the loop -----------------------------------------------------------------------
    def _stateful(self) -> dict:
        return {"train_state": self.state, "loader": self.parts.loader}

    def _resume(self) -> None:
        self.last_finite_loss = float("nan")
        if self.recipe.checkpoint.resume:
            from rwkvclip_dist.checkpoint.reshard import Topology

            self.parts.checkpoints.load(self.parts.engine, self._stateful(), topology=Topology(
                self.launch.world_size, self.recipe.parallel.tensor_parallel, self.parts.global_batch))
        else:
            self.parts.checkpoints.refuse_to_overwrite()

    def _open_logger(self, start_step: int) -> TrainLogger:
        from rwkvclip_dist.model.flops import forward_flops_per_sample

        recipe, cfg = self.recipe, self.parts.model_config
        logger = TrainLogger(recipe.logging, self.run_dir, is_main=self.is_main, total_steps=recipe.train.steps,
                             start_step=start_step, world_size=self.launch.world_size,
                             flops_per_sample=forward_flops_per_sample(cfg),
                             tokens_per_sample=cfg.image.num_patches + cfg.text.context_length)
        groups = self.parts.groups
        logger.message(f"training {cfg.name} on {self.launch.world_size} rank(s) (tensor parallel "
                       f"{groups.tensor_parallel} x data parallel {groups.dp_size}), global batch "
                       f"{self.parts.global_batch}, steps {start_step} -> {recipe.train.steps}, "
                       f"ZeRO-{recipe.parallel.zero_stage} {recipe.parallel.precision}")
        return logger

    def _write_metrics(self, status: str, start_step: int, elapsed: float) -> dict:
        state, global_batch = self.state, self.parts.global_batch
        # Every rank of a node reads the same node-wide counter: the sum over ranks counts each node
        # local_world_size times; the ranks of a tensor-parallel group decode the same samples.
        corrupt = (collectives.all_reduce_mean(self.parts.dataset.num_corrupt) * self.launch.world_size
                   / self.parts.groups.tensor_parallel)
        metrics = {
            "status": status, "steps": state.step, "samples": state.samples, "final_loss": self.last_finite_loss,
            "samples_per_s": (state.step - start_step) * global_batch / max(elapsed, 1e-9),
            "wall_time_s": elapsed, "resumed_from_step": start_step, "world_size": self.launch.world_size,
            "corrupt_samples_replaced": round(corrupt / self.launch.local_world_size),
            "bi_wkv_calls": ops.dispatch_counts(), "samples_masked": state.samples_masked, "evals": state.evals,
        }
        if state.evals:
            metrics.update(state.evals[max(state.evals, key=int)])
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        collectives.barrier()
        return metrics
