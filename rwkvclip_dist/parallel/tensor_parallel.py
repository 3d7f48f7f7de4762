"""Tensor parallelism applied to the plain model: slice its weights by heads, swap in megatron-core layers.

The model (``rwkvclip_dist.model``) stays plain PyTorch; this step changes an instance after it was
built, as torchtitan's ``parallelize`` does. RWKV splits by heads because Bi-WKV is per head:

- time mix: receptance, key, value and gate become ``ColumnParallelLinear`` (each rank computes its
  heads), the per-channel decay, the decay LoRA's second matrix (split by output), the per-head bonus
  and the GroupNorm over heads are sliced with them; the output projection is ``RowParallelLinear``
  (its all-reduce returns the full-width result). The decay LoRA's hidden layer is replicated, so its
  output enters the split part through megatron's copy-to-region (identity forward, all-reduce of
  the gradient backward), like the inputs of the column-parallel layers.
- channel mix: key column-parallel, value row-parallel; receptance (C x C, gating the full-width
  output) stays replicated.
- everything else (token-shift lerps and their LoRA, norms, embeddings, logit scale) is replicated:
  its inputs and output gradients are identical on every rank of a TP group, so are its gradients.

:func:`shard_model` does the slicing alone, on plain modules (no communication): the result is one
rank's local shard, which ``tools/scaling.py`` measures on the meta device. :func:`parallelize` adds
the megatron-core layers and marks the split parameters (``tensor_model_parallel``) for DeepSpeed's
gradient norm. :func:`split_dims` names every split parameter and its dimension, which is what
:func:`merge_shards` needs to put a checkpoint's TP shards back into one plain state dict.
"""
from __future__ import annotations

import torch
from torch import nn

from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.mixing import ChannelMix, TimeMix
from rwkvclip_dist.parallel.groups import ParallelGroups

# Parameter (relative to its TimeMix / ChannelMix) -> dimension split across the TP group.
TIME_MIX_SPLITS = {"receptance.weight": 0, "key.weight": 0, "value.weight": 0, "gate.weight": 0,
                   "output.weight": 1, "decay": 2, "decay_w2": 1, "bonus": 0,
                   "ln_x.weight": 0, "ln_x.bias": 0}
CHANNEL_MIX_SPLITS = {"key.weight": 0, "value.weight": 1}


def tensor_parallel_problems(config: ModelConfig, tensor_parallel: int) -> list[str]:
    """Why ``config`` cannot be split ``tensor_parallel`` ways (empty when it can)."""
    problems = []
    for tower_name in ("image", "text"):
        tower = getattr(config, tower_name)
        heads = tower.width // tower.head_size
        if heads % tensor_parallel:
            problems.append(f"{tower_name} tower has {heads} heads (width {tower.width} / head_size "
                            f"{tower.head_size}), not divisible by tensor_parallel={tensor_parallel}")
        if tower.ffn_dim % tensor_parallel:
            problems.append(f"{tower_name}.ffn_dim={tower.ffn_dim} is not divisible by "
                            f"tensor_parallel={tensor_parallel}")
    return problems


def split_dims(model: nn.Module) -> dict[str, int]:
    """``{parameter name: split dimension}`` of every parameter that tensor parallelism splits."""
    dims = {}
    for prefix, module in model.named_modules():
        table = TIME_MIX_SPLITS if isinstance(module, TimeMix) else CHANNEL_MIX_SPLITS if isinstance(
            module, ChannelMix) else {}
        dims.update({f"{prefix}.{name}": dim for name, dim in table.items()})
    return dims


def _chunk(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ValueError(f"dimension {dim} of a {tuple(tensor.shape)} tensor does not split {size} ways")
    return tensor.detach().chunk(size, dim)[rank].clone()


def _sliced_linear(linear: nn.Linear, dim: int, rank: int, size: int) -> nn.Linear:
    weight = _chunk(linear.weight, dim, rank, size)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    return out


@torch.no_grad()
def shard_model(model: nn.Module, rank: int, size: int) -> nn.Module:
    """Replace every split parameter of ``model`` by TP rank ``rank``'s slice of it, in place, with
    plain modules. The towers' configs are unchanged; each time mix then holds heads
    ``[rank * H / size, (rank + 1) * H / size)``."""
    for module in model.modules():
        if isinstance(module, TimeMix):
            for name in ("receptance", "key", "value", "gate", "output"):
                setattr(module, name, _sliced_linear(getattr(module, name), TIME_MIX_SPLITS[f"{name}.weight"], rank, size))
            for name in ("decay", "decay_w2", "bonus"):
                setattr(module, name, nn.Parameter(_chunk(getattr(module, name), TIME_MIX_SPLITS[name], rank, size)))
            norm = module.ln_x
            local = nn.GroupNorm(norm.num_groups // size, norm.num_channels // size, eps=norm.eps,
                                 device=norm.weight.device, dtype=norm.weight.dtype)
            local.weight = nn.Parameter(_chunk(norm.weight, 0, rank, size))
            local.bias = nn.Parameter(_chunk(norm.bias, 0, rank, size))
            module.ln_x = local
            module.num_heads //= size
        elif isinstance(module, ChannelMix):
            module.key = _sliced_linear(module.key, 0, rank, size)
            module.value = _sliced_linear(module.value, 1, rank, size)
    return model


def parallelize(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Make ``model`` (the full plain model, identical on every rank) this rank's tensor-parallel
    part: sliced weights, megatron-core layers, split parameters marked. A no-op for TP = 1."""
    if groups.tensor_parallel == 1:
        return model
    from rwkvclip_dist.parallel.megatron_layers import column_parallel, mark_split, row_parallel, \
        tensor_parallel_time_mix

    size, group = groups.tensor_parallel, groups.tp_group
    shard_model(model, groups.tp_rank, size)
    for module in model.modules():
        if isinstance(module, TimeMix):
            for name in ("receptance", "key", "value", "gate"):
                setattr(module, name, column_parallel(getattr(module, name), size, group))
            module.output = row_parallel(module.output, size, group)
            for name in ("decay", "decay_w2", "bonus", "ln_x.weight", "ln_x.bias"):
                mark_split(module.get_parameter(name), TIME_MIX_SPLITS[name])
            tensor_parallel_time_mix(module, group)
        elif isinstance(module, ChannelMix):
            module.key = column_parallel(module.key, size, group)
            module.value = row_parallel(module.value, size, group)
    return model


def merge_shards(shards: list[dict[str, torch.Tensor]], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """One plain state dict from the TP ranks' state dicts (in TP rank order): split parameters are
    concatenated along their dimension; replicated ones are taken from rank 0 after checking that
    every rank holds the same shape."""
    if not shards:
        raise ValueError("merge_shards got no shards")
    names = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != names:
            raise ValueError(f"tensor-parallel rank {rank} holds other parameters than rank 0: "
                             f"{sorted(set(shard) ^ names)[:5]}")
    merged = {}
    for name, first in shards[0].items():
        if name in dims:
            merged[name] = torch.cat([shard[name] for shard in shards], dim=dims[name])
            continue
        shapes = {tuple(shard[name].shape) for shard in shards}
        if len(shapes) != 1:
            raise ValueError(f"replicated parameter {name} has different shapes on the TP ranks: {shapes}")
        merged[name] = first
    return merged
