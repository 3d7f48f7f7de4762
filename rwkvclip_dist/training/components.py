"""Everything a run is built from, made from the recipe in one place and in a fixed order.

The order matters for reproducibility: every rank seeds the same generator before the model is
initialised (identical full weights; under tensor parallelism each rank then keeps its slice), then
the stream of its data-parallel rank before anything draws per-rank randomness (stochastic depth:
the ranks of a tensor-parallel group hold the same samples and must drop the same paths). Each
builder takes its recipe section; the section's values were checked when the recipe loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed import DeepSpeedEngine
from torch import nn

from rwkvclip_dist import ops
from rwkvclip_dist.checkpoint.manager import CheckpointManager
from rwkvclip_dist.data.dataset import ThreeTextDataset
from rwkvclip_dist.data.loader import build_train_dataloader
from rwkvclip_dist.data.counting_loader import StreamingDataLoader
from rwkvclip_dist.loss import build_loss
from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.registry import create_model
from rwkvclip_dist.parallel.compile import compile_blocks
from rwkvclip_dist.parallel.deepspeed_compat import describe_tensor_parallel
from rwkvclip_dist.parallel.engine import create_engine, deepspeed_config
from rwkvclip_dist.parallel.groups import ParallelGroups, init_parallel_groups
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.parallel.tensor_parallel import parallelize, split_dims
from rwkvclip_dist.training import rng
from rwkvclip_dist.training.evals import ZeroShotTask
from rwkvclip_dist.training.lock import apply_lock
from rwkvclip_dist.training.optim import build_optimizer
from rwkvclip_dist.training.recipe import Recipe
from rwkvclip_dist.training.schedule import Schedule, build_schedule


@dataclass
class Components:
    engine: DeepSpeedEngine
    """The DeepSpeed engine: model, optimizer, ZeRO partitioning, precision."""
    model_config: ModelConfig
    base_lrs: list[float]
    """Peak lr of each optimizer parameter group; the schedule scales them."""
    device: torch.device
    """This rank's device, where its batches go."""
    dtype: torch.dtype
    """Dtype of the model's inputs (bf16 under bf16 training)."""
    loss_fn: nn.Module
    loader: StreamingDataLoader
    dataset: ThreeTextDataset
    schedule: Schedule
    checkpoints: CheckpointManager
    """Saves when due (``checkpoint.every_steps`` and the last step) or when the loop stops."""
    evals: list[ZeroShotTask]
    global_batch: int
    groups: ParallelGroups
    """Tensor- and data-parallel rank, size and group."""


def checkpoint_directory(recipe: Recipe, run_dir: Path) -> Path:
    """Where the run's checkpoints go: ``checkpoint.dir``, or ``<run dir>/checkpoints``."""
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else run_dir / "checkpoints"


class RunComplete(Exception):
    """The run directory holds a finished run: nothing to do, nothing to write."""


def check_run_directory(recipe: Recipe, run_dir: Path) -> None:
    """Before anything is written to the run directory: a run that starts over
    (``checkpoint.resume: false``) where an earlier run's checkpoints are is refused
    (``CheckpointError``); a run started again after it finished (its newest checkpoint at
    ``train.steps`` or past it, and its ``metrics.json`` written) raises :class:`RunComplete`."""
    for what, folder in (("--run-dir", run_dir), ("checkpoint.dir", checkpoint_directory(recipe, run_dir))):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{what} {folder}: is a file; a run's {what.strip('-')} is a folder")
    checkpoints = CheckpointManager(checkpoint_directory(recipe, run_dir))
    if not recipe.checkpoint.resume:
        checkpoints.refuse_to_overwrite()
        return
    tag = checkpoints.latest_tag()
    step = checkpoints.read_record(tag).step if tag is not None else None
    if step is not None and step >= recipe.train.steps and (run_dir / "metrics.json").is_file():
        raise RunComplete(f"the run in {run_dir} is complete at step {step} (checkpoint "
                          f"{checkpoints.directory / tag}, train.steps={recipe.train.steps}); nothing to do, "
                          f"nothing changed (raise train.steps to train on)")


def build_components(recipe: Recipe, run_dir: Path, launch: LaunchEnv, device: torch.device,
                     evals: list[ZeroShotTask], initial=None) -> Components:
    """``evals``: the opened in-loop evaluations (``training.evals.open_evaluations``); ``initial``:
    the checked ``model.init_from`` weights (``training.init_from.prepare_init_from``), or None."""
    accum, section = recipe.train.accumulation_steps, recipe.parallel
    groups = init_parallel_groups(section.tensor_parallel, section.timeout_s)
    rng.seed_all(recipe.train.seed)  # identical initial weights on every rank
    model = create_model(recipe.model.name, **recipe.model.overrides)
    if initial is not None:  # into the plain model, before TP slices it and ZeRO partitions it
        initial.apply(model)
    # Build or load the fused Bi-WKV kernels now, not inside the first (possibly compiled) step.
    ops.prepare(device, torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32,
                tuple({model.config.image.head_size, model.config.text.head_size}))
    model = parallelize(model, groups)
    describe_tensor_parallel(model, split_dims(model) if groups.tensor_parallel > 1 else {})
    model.set_activation_checkpointing(recipe.model.activation_checkpointing)
    if recipe.model.compile:
        compile_blocks(model, recipe.model.compile_backend)
    apply_lock(model, recipe.model.lock)  # frozen before the optimizer and ZeRO see the parameters
    optimizer = build_optimizer(model, recipe.optimizer, device, offload=section.offload_optimizer == "cpu")
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    engine = create_engine(model, optimizer, deepspeed_config(
        section, micro_batch=recipe.data.batch_size // accum, accumulation_steps=accum,
        world_size=groups.dp_size, grad_clip=recipe.optimizer.grad_clip), mpu=groups.mpu)
    rng.seed_all(recipe.train.seed + 1 + groups.dp_rank)  # each data-parallel rank draws its own masks
    image_size = model.config.image.image_size
    loader, dataset = build_train_dataloader(recipe.data, image_size, recipe.train.seed,
                                             replication=groups.tensor_parallel)
    return Components(
        engine=engine, model_config=model.config, base_lrs=base_lrs, device=device,
        dtype=torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32,
        loss_fn=build_loss(recipe.loss, group=groups.dp_group), loader=loader, dataset=dataset,
        schedule=build_schedule(recipe.schedule, recipe.train.steps),
        checkpoints=CheckpointManager(checkpoint_directory(recipe, run_dir), recipe.checkpoint.keep_last,
                                      recipe.checkpoint.every_steps, last_step=recipe.train.steps,
                                      remote=recipe.checkpoint.remote),
        evals=evals, global_batch=recipe.data.batch_size * groups.dp_size, groups=groups)
