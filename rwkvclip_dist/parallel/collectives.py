"""The few collectives the training code needs, each a no-op when torch.distributed is not set up.

``all_gather_with_grad`` is the one the contrastive loss relies on: the forward concatenates every
rank's rows; the backward sums the incoming gradient over ranks (every rank's loss depends on every
rank's features) and hands each rank the slice of its own rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in ``group`` (default: the world)."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (default: the world)."""
    return dist.get_rank(group) if is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.rows, ctx.group = dist.get_rank(group), tensor.shape[0], group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from the ranks of ``group`` (default: all) along dim 0, differentiably
    (equal shapes required)."""
    if world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_constant(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (no gradient: masks, labels) from the ranks of ``group`` along dim 0."""
    if world_size(group) == 1:
        return tensor
    device = tensor.device
    parts = [torch.empty_like(tensor, device=_comm_device()) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.detach().to(_comm_device()).contiguous(), group=group)
    return torch.cat(parts, dim=0).to(device)


def all_gather_no_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` from the ranks of ``group`` along dim 0; gradients flow only into the
    local rows."""
    if world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    # Keep the local slice attached to the graph so the local rows still receive their gradient.
    parts[rank(group)] = tensor
    return torch.cat(parts, dim=0)


def _comm_device() -> torch.device:
    # NCCL only moves GPU tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (ranks agree on stopping, skipping...)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_mean(value: float) -> float:
    """The mean over ranks of one float, for logging."""
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few floats (float64), in one collective."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (a small picklable value produced by this code, not read from files) on every rank."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]
