"""Everything a run is built from, made from the recipe in one place and in a fixed order.

The order matters for reproducibility: every rank seeds the same generator before the model is
initialised (identical weights), then its own stream before anything draws per-rank randomness
(stochastic depth). Each builder takes its recipe section; the section's values were checked when the
recipe loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def checkpoint_dir(recipe: Recipe, run_dir: Path) -> Path:
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else run_dir / "checkpoints"


def build_components(recipe: Recipe, run_dir: Path, launch: LaunchEnv, device: torch.device) -> Components:
    from rwkvclip_dist.checkpoint.manager import CheckpointManager
    from rwkvclip_dist.data.loader import build_train_dataloader
    from rwkvclip_dist.loss import build_loss
    from rwkvclip_dist.model.registry import create_model
    from rwkvclip_dist.parallel.engine import create_engine, deepspeed_config
    from rwkvclip_dist.training.evals import ZeroShotTask
    from rwkvclip_dist.training.optim import build_optimizer
    from rwkvclip_dist.training.schedule import build_schedule

    accum = recipe.train.accumulation_steps
    rng.seed_all(recipe.train.seed)  # identical initial weights on every rank
    model = create_model(recipe.model.name, **recipe.model.overrides)
    model.set_activation_checkpointing(recipe.model.activation_checkpointing)
    optimizer = build_optimizer(model, recipe.optimizer, device)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    engine = create_engine(model, optimizer, deepspeed_config(
        recipe.parallel, micro_batch=recipe.data.batch_size // accum, accumulation_steps=accum,
        world_size=launch.world_size, grad_clip=recipe.optimizer.grad_clip))
    rng.seed_all(recipe.train.seed + 1 + launch.rank)  # each rank draws its own stochastic-depth masks
    image_size = model.config.image.image_size
    loader, dataset = build_train_dataloader(recipe.data, image_size, recipe.train.seed)
    return Components(
        engine=engine, model_config=model.config, base_lrs=base_lrs,
        dtype=torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32,
        loss_fn=build_loss(recipe.loss), loader=loader, dataset=dataset,
        schedule=build_schedule(recipe.schedule, recipe.train.steps),
        checkpoints=CheckpointManager(checkpoint_dir(recipe, run_dir), recipe.checkpoint.keep_last),
        evals=[ZeroShotTask(section, image_size, model.config.text.context_length, device)
               for section in recipe.eval.zeroshot],
        global_batch=recipe.data.batch_size * launch.world_size)
