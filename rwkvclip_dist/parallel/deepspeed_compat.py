"""Every use of DeepSpeed's private names, in one place, for the versions they were read from.

DeepSpeed does not promise these names; a release that renames one would otherwise fail deep inside a
run. Importing this module checks the installed version against ``WRITTEN_FOR`` and refuses, in one
line naming both, when it is outside (tests/test_layout.py checks that no other module touches
DeepSpeed's private names). Widen the range after reading the new release's code for each name here.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

from rwkvclip_dist.versions import require_version

WRITTEN_FOR = ("0.19", "0.20")
"""Lowest version read, first version not read (pyproject.toml's bounds; CI runs 0.19.8)."""

require_version("deepspeed", WRITTEN_FOR, "rwkvclip_dist/parallel/deepspeed_compat.py")


def ensure_world_group(world_size: int, timeout: timedelta) -> None:
    """ZeRO runs its collectives on a clone of the world group that DeepSpeed creates on first use,
    with torch's default timeout (30 min gloo, 10 min NCCL), not ours: create it with ``timeout``."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world_size)), timeout=timeout)


def zero3_fp32_partition(param: Any) -> Any:
    """This rank's slice of ZeRO-3's fp32 master copy of ``param`` (a tensor to edit in place)."""
    partition, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    return partition


def checkpoint_classes() -> list[type]:
    """The DeepSpeed classes its checkpoint files legitimately hold; none runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def replace_checkpoint_loader(engine: Any, load: Callable[..., Any]) -> None:
    """Make ``engine`` read every checkpoint file (model, optimizer, ZeRO shards) with ``load(path,
    map_location)``: DeepSpeed's checkpoint engine calls ``torch.load(..., weights_only=False)``."""
    engine.checkpoint_engine.load = load
