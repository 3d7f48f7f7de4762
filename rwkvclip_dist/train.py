"""Train RWKV-CLIP from a recipe, on one process or many.

    deepspeed rwkvclip_dist/train.py --recipe recipes/X.yaml [--run-dir DIR] [key.sub=value ...]
    torchrun --nproc-per-node 8 rwkvclip_dist/train.py --recipe ...
    srun python rwkvclip_dist/train.py --recipe ...          (Slurm: one task per GPU)
    python rwkvclip_dist/train.py --recipe ...                (single-process debug run)

The run directory receives the resolved recipe (``recipe.yaml``), checkpoints, TensorBoard logs,
``loss_log.jsonl`` (one line per step) and, at the end, ``metrics.json``. A run resumes from the
newest complete checkpoint in its checkpoint directory unless ``checkpoint.resume=false``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Launched as a script (``deepspeed rwkvclip_dist/train.py``): make the package importable.
    # Replace the script's own directory, whose module names would shadow nothing but confuse.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch

from rwkvclip_dist.checkpoint.manager import CheckpointManager
from rwkvclip_dist.logging_metrics import TrainLogger, detect_peak_flops
from rwkvclip_dist.loss import build_loss
from rwkvclip_dist.optim import build_optimizer
from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.parallel.accumulation import contrastive_step, split_micro_batches
from rwkvclip_dist.parallel.engine import clamp_parameter_, create_engine, deepspeed_config, init_distributed
from rwkvclip_dist.parallel.launch_env import LaunchEnv, detect_launch_env
from rwkvclip_dist.parallel.preemption import PreemptionHandler
from rwkvclip_dist.recipe import Recipe, load_recipe, save_recipe
from rwkvclip_dist.typed_config import to_plain
from rwkvclip_dist.schedule import build_schedule, set_lr

log = logging.getLogger("rwkvclip_dist.train")
MAX_LOGIT_SCALE = math.log(100.0)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<recipe name>)")
    # The deepspeed launcher appends --local_rank=N; the environment carries the same value.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. optimizer.lr=3e-4")
    return parser.parse_args(argv)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_process(launch: LaunchEnv) -> torch.device:
    # DeepSpeed's ZeRO calls a torch collective that torch has deprecated, once per step per rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {launch.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    if torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank)
    # Ranks sharing a CPU split its cores instead of each spawning one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    return torch.device("cpu")


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, launch: LaunchEnv) -> None:
        self.recipe, self.run_dir, self.launch = recipe, run_dir, launch
        self.device = _setup_process(launch)
        init_distributed(launch, recipe.parallel.backend)
        self.is_main = launch.rank == 0
        if recipe.demo_data and launch.local_rank == 0:
            from rwkvclip_dist.data.demo_digits import ensure_demo_data

            ensure_demo_data(recipe.demo_data)
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
        collectives.barrier()
        self._build()

    def _build(self) -> None:
        from rwkvclip_dist import create_model
        from rwkvclip_dist.data.loader import build_train_dataloader

        recipe = self.recipe
        accum = recipe.train.accumulation_steps
        if accum < 1 or recipe.data.batch_size % accum:
            raise ValueError(f"train.accumulation_steps={accum} must divide data.batch_size={recipe.data.batch_size}")
        _seed_all(recipe.train.seed)  # identical initial weights on every rank
        model = create_model(recipe.model.name, **recipe.model.overrides)
        if recipe.model.activation_checkpointing:
            model.set_activation_checkpointing(True)
        self.model_config = model.config
        opt = recipe.optimizer
        optimizer = build_optimizer(model, opt.lr, opt.weight_decay, opt.betas, opt.eps, opt.decay_everything)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.engine = create_engine(model, optimizer, deepspeed_config(
            micro_batch=recipe.data.batch_size // accum, accumulation_steps=accum,
            world_size=self.launch.world_size, zero_stage=recipe.parallel.zero_stage,
            precision=recipe.parallel.precision, grad_clip=opt.grad_clip,
            allgather_bucket_size=recipe.parallel.allgather_bucket_size,
            reduce_bucket_size=recipe.parallel.reduce_bucket_size, overlap_comm=recipe.parallel.overlap_comm))
        self.dtype = torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32
        # Each rank draws its own stochastic-depth masks.
        _seed_all(recipe.train.seed + 1 + self.launch.rank)
        self.loss_fn = build_loss(recipe.loss.kind, recipe.loss.local_loss, recipe.loss.gather_with_grad,
                                  recipe.loss.siglip_bias)
        self.image_size = model.config.image.image_size
        self.loader, self.dataset = build_train_dataloader(recipe.data, self.image_size, recipe.train.seed)
        self.schedule = build_schedule(recipe.schedule.kind, recipe.train.steps, recipe.schedule.warmup_fraction,
                                       recipe.schedule.min_lr_ratio, recipe.schedule.onecycle_div_factor,
                                       recipe.schedule.onecycle_final_div_factor)
        ckpt_dir = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpoints = CheckpointManager(ckpt_dir, recipe.checkpoint.keep_last)

    # ---------------------------------------------------------------------------------------------
    def _client_state(self) -> dict:
        return {"step": self.step, "samples": self.samples, "nonfinite_in_a_row": self.nonfinite,
                "loader": self.loader.state_dict(), "evals": self.evals, "recipe": to_plain(self.recipe)}

    def _resume(self) -> None:
        self.step, self.samples, self.nonfinite, self.evals = 0, 0, 0, {}
        if not self.recipe.checkpoint.resume:
            return
        state = self.checkpoints.load(self.engine)
        if state is None:
            return
        self.step, self.samples = state["step"], state["samples"]
        self.nonfinite, self.evals = state["nonfinite_in_a_row"], state["evals"]
        self.loader.load_state_dict(state["loader"])

    def _backward(self, loss: torch.Tensor) -> None:
        # Every micro-batch's loss is the whole step's loss (see parallel.accumulation): no 1/K.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def _next_batch(self):
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)  # Streaming moves on to the next epoch
            return next(self._iterator)

    def _evaluate(self, tasks, logger: TrainLogger) -> None:
        results: dict[str, float] = {}
        for task in tasks:
            results.update(task.run(self.engine.module))
        self.evals[str(self.step)] = results
        logger.write_scalars(self.step, {f"eval/{k}": v for k, v in results.items()})
        logger.message(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def _make_tasks(self):
        from rwkvclip_dist.train_eval import ZeroShotTask

        return [ZeroShotTask(section, self.image_size, self.dtype, self.device)
                for section in self.recipe.eval.zeroshot]

    def run(self) -> dict:
        from rwkvclip_dist.model.flops import forward_flops_per_sample

        recipe = self.recipe
        self._resume()
        start_step, total = self.step, recipe.train.steps
        global_batch = recipe.data.batch_size * self.launch.world_size
        cfg = self.model_config
        logger = TrainLogger(
            self.run_dir, is_main=self.is_main, total_steps=total, start_step=start_step,
            every=recipe.logging.every_steps, tensorboard=recipe.logging.tensorboard,
            progress_bar=recipe.logging.progress_bar, world_size=self.launch.world_size,
            flops_per_sample=forward_flops_per_sample(cfg),
            tokens_per_sample=cfg.image.num_patches + cfg.text.context_length,
            peak_flops=recipe.logging.peak_flops_per_device or detect_peak_flops())
        tasks = self._make_tasks()
        preemption = PreemptionHandler().install()
        logger.message(f"training {cfg.name} on {self.launch.world_size} rank(s), global batch {global_batch}, "
                       f"steps {start_step} -> {total}, ZeRO-{recipe.parallel.zero_stage} {recipe.parallel.precision}")
        self._iterator = iter(self.loader)
        started, last_loss, status = time.perf_counter(), float("nan"), "completed"
        try:
            while self.step < total:
                wait_start = time.perf_counter()
                images, tokens = self._next_batch()[:2]
                data_wait = time.perf_counter() - wait_start
                micro = split_micro_batches(images.to(self.device, self.dtype), tokens.to(self.device),
                                            recipe.train.accumulation_steps)
                lr = set_lr(self.engine.optimizer, self.base_lrs, self.schedule.factor(self.step))
                out = contrastive_step(self.engine, self.loss_fn, self._backward, micro)
                loss = collectives.all_reduce_mean(out.loss)
                grad_norm = None
                if out.finite:
                    clamp_parameter_(self.engine, self.engine.module.logit_scale, 0.0, MAX_LOGIT_SCALE)
                    norm = self.engine.get_global_grad_norm()
                    grad_norm = None if norm is None else float(norm)
                    self.nonfinite, last_loss = 0, loss
                else:
                    self.nonfinite += 1
                    logger.message(f"step {self.step + 1}: non-finite loss ({loss}), step skipped "
                                   f"({self.nonfinite} in a row, limit {recipe.train.max_nonfinite_steps})")
                self.step += 1
                self.samples += global_batch
                logger.log_step(self.step, loss=loss, lr=lr, logit_scale=out.logit_scale, grad_norm=grad_norm,
                                global_samples=global_batch, data_wait=data_wait, skipped=not out.finite)
                if self.nonfinite >= recipe.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"stopping: the loss was non-finite for {self.nonfinite} steps in a row (steps "
                        f"{self.step - self.nonfinite + 1}-{self.step}); lower optimizer.lr, check the data, or "
                        f"raise train.max_nonfinite_steps. The last checkpoint is still intact.")
                due = [t for t in tasks if t.due(self.step)]
                if due:
                    self._evaluate(due, logger)
                stop = preemption.should_stop()
                every = recipe.checkpoint.every_steps
                if stop or self.step == total or (every and self.step % every == 0):
                    self.checkpoints.save(self.engine, self.step, self._client_state())
                if stop:
                    status = "preempted"
                    logger.message(f"stop signal received: saved step {self.step}, exiting")
                    break
            if status == "completed" and recipe.eval.at_end and tasks and str(self.step) not in self.evals:
                self._evaluate(tasks, logger)
        finally:
            preemption.uninstall()
            logger.close()
        elapsed = time.perf_counter() - started
        metrics = {
            "status": status, "steps": self.step, "samples": self.samples, "final_loss": last_loss,
            "samples_per_s": (self.step - start_step) * global_batch / max(elapsed, 1e-9),
            "wall_time_s": elapsed, "resumed_from_step": start_step, "world_size": self.launch.world_size,
            "evals": self.evals,
        }
        if self.evals:
            metrics.update(self.evals[max(self.evals, key=int)])
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        collectives.barrier()
        return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.recipe).stem)
    trainer = Trainer(recipe, run_dir, detect_launch_env())
    metrics = trainer.run()
    if trainer.is_main:
        figures = {k: v for k, v in metrics.items() if k not in ("evals",)}
        print(json.dumps(figures, indent=None), flush=True)
    return metrics


if __name__ == "__main__":
    main()
