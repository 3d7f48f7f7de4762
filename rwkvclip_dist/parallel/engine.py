"""DeepSpeed engine setup from a recipe, and the few engine operations the train loop needs.

The client optimizer is torch's AdamW (fused on GPUs; no JIT-built op), or DeepSpeed's CPU Adam under
ZeRO-Offload (``offload_optimizer: cpu``), with our own parameter groups; the
learning rate is set by ``rwkvclip_dist.training.schedule`` before each step rather than by a DeepSpeed
scheduler, so that it is a pure function of the step counter. Gradient accumulation is ours
(``training.accumulation``): DeepSpeed is told the number of micro-batches so it steps only at the
boundary, and each backward is called with ``scale_wrt_gas=False`` because every micro-batch's loss
already is the full step's loss.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
from torch import nn

from rwkvclip_dist.parallel.deepspeed_compat import (ensure_world_group, import_muon_lazily,
                                                     skip_cpu_inference_all_reduce, zero3_fp32_partition)
from rwkvclip_dist.parallel.launch_env import LaunchEnv, export_to_environ
from rwkvclip_dist.typed_config import FieldError

NEVER = 10**12


@dataclass
class ParallelSection:
    """The ``parallel:`` section of a recipe."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: Literal["bf16", "fp32"] = "bf16"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; 'auto' is nccl on GPUs and gloo on CPU."""
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = False
    """ZeRO-2/3 communication overlap; worth it on GPUs, a waste of memory on CPU."""
    tensor_parallel: int = 1
    """Tensor-parallel degree (megatron-core): each tower's heads and channel-mix hidden units are
    split over this many consecutive ranks, which all see the same batch; world size = tensor_parallel
    x data-parallel size, and ZeRO partitions over the data-parallel group. 1: no megatron-core at all."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """'cpu': ZeRO-Offload. The fp32 master weights and Adam moments live in host memory and
    DeepSpeed's CPU Adam (a JIT-built op) updates them; needs zero_stage >= 1."""
    timeout_s: float = 1800.0
    """Seconds any collective may wait for the other ranks before this rank gives up and exits
    (a peer that died or hangs). Longer than the slowest step, evaluation or checkpoint save; the
    default suits large clusters, whose saves and first steps can take minutes."""

    def __post_init__(self) -> None:
        if not 1 <= self.timeout_s <= 7 * 24 * 3600:
            raise FieldError("timeout_s", f"must be between 1 and {7 * 24 * 3600} seconds, got {self.timeout_s}")
        for name in ("allgather_bucket_size", "reduce_bucket_size", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise FieldError("offload_optimizer", "ZeRO-Offload needs zero_stage >= 1 (it offloads the "
                             "partitioned optimizer states)")


def init_process_group(launch: LaunchEnv, backend: str = "auto", timeout_s: float = 1800.0) -> str:
    """Create torch.distributed's default process group for ``launch`` and return its backend: the
    set-up without DeepSpeed, which the evaluation tool's ranks use as they are (no engine)."""
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    export_to_environ(launch)
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized():
        return backend
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's static rendezvous (--master-port) keeps one store across --max-restarts, and
        # env:// adds no per-attempt prefix: a restarted rank would read the dead attempt's addresses
        # and fail to connect. Key this attempt's process groups by the restart count.
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                              timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"rwkvclip/attempt_{attempt}", store),
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)
    return backend


def init_distributed(launch: LaunchEnv, backend: str = "auto", timeout_s: float = 1800.0) -> str:
    """The process group (``init_process_group``, also for world size 1: DeepSpeed needs one), then
    DeepSpeed's communication layer over it.

    Every collective of the run, ours and DeepSpeed's, waits at most ``timeout_s`` for the other
    ranks. gloo raises in the waiting rank; NCCL's watchdog aborts the communicator and, with torch's
    default ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``, ends the process (docs/reliability.md).
    """
    import deepspeed

    backend = init_process_group(launch, backend, timeout_s)
    timeout = timedelta(seconds=timeout_s)
    skip_cpu_inference_all_reduce()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    ensure_world_group(launch.world_size, timeout)
    return backend


def deepspeed_config(section: ParallelSection, *, micro_batch: int, accumulation_steps: int, world_size: int,
                     grad_clip: float) -> dict[str, Any]:
    """DeepSpeed's config dict for a recipe's ``parallel:`` section (checked when the recipe loaded).

    ``world_size`` counts data-parallel ranks: the world divided by ``tensor_parallel``."""
    zero: dict[str, Any] = {"stage": section.zero_stage}
    if section.zero_stage >= 1:
        zero.update(allgather_bucket_size=section.allgather_bucket_size,
                    reduce_bucket_size=section.reduce_bucket_size, overlap_comm=section.overlap_comm,
                    contiguous_gradients=True)
    if section.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch * accumulation_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": section.precision == "bf16"},
        # torch's AdamW is not on DeepSpeed's list of ZeRO-tested optimizers, but it is a plain
        # torch.optim.Optimizer, which ZeRO 1-3 handle.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], mpu=None):
    """``deepspeed.initialize`` with our model, client optimizer and config, and under tensor
    parallelism the process groups (``parallel.groups.DeepSpeedMPU``); returns the engine."""
    import deepspeed

    # DeepSpeed logs its whole config at INFO on every rank; keep the console for our own lines.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed views every parameter as bytes to broadcast it (at start-up, and in ZeRO-3's
    # partitioning), which fails for 0-dim tensors such as logit_scale. They train as shape [1];
    # ``logit_scale.exp()`` then broadcasts the same way in the loss.
    for param in model.parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
    import_muon_lazily()  # ZeRO's optimizers import it; as it is, that costs ~2.2 s of CPU per rank
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def clamp_parameter_(engine, param: nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place on every copy the optimizer keeps (fp32 master and model weight).

    Under ZeRO and bf16 the optimizer updates an fp32 master copy and overwrites the model weight from
    it, so clamping only the model weight would be undone at the next step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            with torch.no_grad():
                param.clamp_(low, high)
        # ZeRO-3: clamp is elementwise, so each rank clamps its own slice of the fp32 master.
        # (safe_set_full_fp32_param cannot set a parameter with fewer elements than ranks.)
        zero3_fp32_partition(param).data.clamp_(low, high)
        return
    master = safe_get_full_fp32_param(param)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(low, high))
    with torch.no_grad():
        param.clamp_(low, high)

