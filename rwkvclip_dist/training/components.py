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
from typing import Any

import torch
from torch import nn

from rwkvclip_dist import ops
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.training import rng
from rwkvclip_dist.training.recipe import Recipe


@dataclass
class Components:
    engine: Any
    """The DeepSpeed engine: model, optimizer, ZeRO partitioning, precision."""
    model_config: Any
    base_lrs: list[float]
    """Peak lr of each optimizer parameter group; the schedule scales them."""
    dtype: torch.dtype
    """Dtype of the model's inputs (bf16 under bf16 training)."""
    loss_fn: nn.Module
    loader: Any
    dataset: Any
    schedule: Any
    checkpoints: Any
    evals: list
    global_batch: int
    groups: Any
    """``parallel.groups.ParallelGroups``: tensor- and data-parallel rank, size and group."""


def checkpoint_directory(recipe: Recipe, run_dir: Path) -> Path:
    """Where the run's checkpoints go: ``checkpoint.dir``, or ``<run dir>/checkpoints``."""
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else run_dir / "checkpoints"


def check_resume_compatible(recipe: Recipe, run_dir: Path) -> None:
    """Before any process group or engine starts: the checkpoint a run would resume from must have
    been written with its tensor_parallel (each TP rank's shards hold other slices of the weights
    and optimizer states)."""
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.typed_config import ConfigError

    if not recipe.checkpoint.resume:
        return
    checkpoints = CheckpointManager(checkpoint_directory(recipe, run_dir))
    tag = checkpoints.latest_tag()
    if tag is None:
        return
    saved, tp = checkpoints.read_record(tag).get("tensor_parallel", 1), recipe.parallel.tensor_parallel
    if saved != tp:
        raise ConfigError(
            f"checkpoint {checkpoints.directory / tag} was saved with parallel.tensor_parallel={saved}, "
            f"this run has {tp}: resume with parallel.tensor_parallel={saved}, or start a new run "
            f"(checkpoint.resume=false or another checkpoint.dir); tools/convert_checkpoint.py from-zero "
            f"merges its shards into one file of weights")


def build_components(recipe: Recipe, run_dir: Path, launch: LaunchEnv, device: torch.device,
                     evals: list) -> Components:
    """``evals``: the opened in-loop evaluations (``training.evals.open_evaluations``)."""
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.data.loader import build_train_dataloader
    from rwkvclip_dist.loss import build_loss
    from rwkvclip_dist.model.registry import create_model
    from rwkvclip_dist.parallel.engine import create_engine, deepspeed_config
    from rwkvclip_dist.parallel.groups import init_parallel_groups
    from rwkvclip_dist.checkpoint.deepspeed_universal import describe_tensor_parallel
    from rwkvclip_dist.parallel.tensor_parallel import parallelize, split_dims
    from rwkvclip_dist.training.optim import build_optimizer
    from rwkvclip_dist.training.schedule import build_schedule

    accum, section = recipe.train.accumulation_steps, recipe.parallel
    groups = init_parallel_groups(section.tensor_parallel, section.timeout_s)
    rng.seed_all(recipe.train.seed)  # identical initial weights on every rank
    model = create_model(recipe.model.name, **recipe.model.overrides)
    # Build or load the fused Bi-WKV kernels now, not inside the first (possibly compiled) step.
    ops.prepare(device, torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32,
                tuple({model.config.image.head_size, model.config.text.head_size}))
    model = parallelize(model, groups)
    describe_tensor_parallel(model, split_dims(model) if groups.tensor_parallel > 1 else {})
    model.set_activation_checkpointing(recipe.model.activation_checkpointing)
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
        engine=engine, model_config=model.config, base_lrs=base_lrs,
        dtype=torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32,
        loss_fn=build_loss(recipe.loss, group=groups.dp_group), loader=loader, dataset=dataset,
        schedule=build_schedule(recipe.schedule, recipe.train.steps),
        checkpoints=CheckpointManager(checkpoint_directory(recipe, run_dir), recipe.checkpoint.keep_last,
                                      recipe.checkpoint.remote),
        evals=evals, global_batch=recipe.data.batch_size * groups.dp_size, groups=groups)
