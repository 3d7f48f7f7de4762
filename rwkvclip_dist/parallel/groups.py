"""The process groups of a run: tensor parallel (TP) inside data parallel (DP), world = TP x DP.

With ``parallel.tensor_parallel: 1`` there is one data-parallel group, the world, and nothing of
megatron-core is imported: the run is exactly the plain DeepSpeed one. With TP > 1, megatron-core's
``parallel_state`` creates the groups (its default order puts TP innermost, so ranks 0..TP-1 form
the first TP group, and rank r has DP rank r // TP); :class:`DeepSpeedMPU` hands them to DeepSpeed as
its ``mpu``, so ZeRO partitions and reduces gradients over the DP group only and the gradient norm
for clipping is summed over both (DeepSpeed counts a TP-split parameter on every TP rank and a
replicated one on TP rank 0 only).

Randomness under TP: every rank builds the full plain model from the same seed and keeps its slice
(``tensor_parallel.parallelize``), so no per-rank initialisation stream is needed; megatron-core's
CUDA RNG tracker is not used (it needs CUDA). The only random draw inside the towers is stochastic
depth, which acts on full-width replicated activations and must be the same on every rank of a TP
group: the trainer seeds the per-rank stream with the DP rank (``training.components``), so the ranks
of a TP group draw the same masks and different DP ranks different ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from rwkvclip_dist.parallel import collectives
from rwkvclip_dist.typed_config import ConfigError


@dataclass(frozen=True)
class ParallelGroups:
    """Where this rank sits in TP x DP. ``None`` groups mean the default (world) group."""

    tensor_parallel: int
    tp_rank: int
    dp_rank: int
    dp_size: int
    tp_group: Any = None
    dp_group: Any = None

    @property
    def mpu(self) -> "DeepSpeedMPU | None":
        """What ``deepspeed.initialize(mpu=...)`` takes; None without tensor parallelism."""
        return DeepSpeedMPU(self) if self.tensor_parallel > 1 else None


def check_world_size(tensor_parallel: int, world_size: int) -> None:
    """A clear error when the launched world does not split into tensor-parallel groups."""
    if world_size % tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={tensor_parallel} does not divide the world size "
                          f"{world_size}: launch a multiple of {tensor_parallel} ranks (world = TP x DP)")


def init_parallel_groups(tensor_parallel: int, timeout_s: float = 1800.0) -> ParallelGroups:
    """Create the TP and DP groups (collective over the default group, which must exist); their
    collectives wait at most ``timeout_s`` for a peer, like the default group's."""
    world, rank = collectives.world_size(), collectives.rank()
    check_world_size(tensor_parallel, world)
    if tensor_parallel == 1:
        return ParallelGroups(1, 0, rank, world)
    from megatron.core import parallel_state

    # Gloo side groups are megatron's for its own CPU metadata exchange, which we never use.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             create_gloo_process_groups=False,
                                             distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
    return ParallelGroups(tensor_parallel, parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                          parallel_state.get_tensor_model_parallel_group(), parallel_state.get_data_parallel_group())


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed queries (the methods its engine, ZeRO stages 1-3, gradient
    clipping and checkpoint naming call). Model parallel = tensor parallel here: no pipeline stages."""

    def __init__(self, groups: ParallelGroups) -> None:
        self._groups = groups

    def get_model_parallel_rank(self) -> int:
        return self._groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._groups.tensor_parallel

    def get_model_parallel_group(self):
        return self._groups.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self._groups.tp_group, 0)

    def get_data_parallel_rank(self) -> int:
        return self._groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._groups.dp_size

    def get_data_parallel_group(self):
        return self._groups.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._groups.dp_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
