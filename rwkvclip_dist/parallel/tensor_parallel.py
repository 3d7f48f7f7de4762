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

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.mixing import ChannelMix, TimeMix
from rwkvclip_dist.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class Split:
    """How tensor parallelism splits one layer or parameter of a time mix or channel mix.

    ``column``: an ``nn.Linear`` split by output features (weight dim 0), megatron's ColumnParallelLinear;
    ``row``: split by input features (weight dim 1), RowParallelLinear, whose forward all-reduces;
    ``norm``: the GroupNorm over heads, its groups and affine parameters split (dim 0);
    ``param``: a plain parameter split along ``dim``.
    """

    kind: Literal["column", "row", "norm", "param"]
    dim: int

    def parameters(self, name: str) -> dict[str, int]:
        """``{parameter name relative to the mixing module: split dimension}`` of the layer ``name``."""
        if self.kind in ("column", "row"):
            return {f"{name}.weight": self.dim}
        if self.kind == "norm":
            return {f"{name}.weight": self.dim, f"{name}.bias": self.dim}
        return {name: self.dim}


COLUMN, ROW, NORM = Split("column", 0), Split("row", 1), Split("norm", 0)
PLAN: dict[type[nn.Module], dict[str, Split]] = {
    TimeMix: {"receptance": COLUMN, "key": COLUMN, "value": COLUMN, "gate": COLUMN, "output": ROW,
              "decay": Split("param", 2), "decay_w2": Split("param", 1), "bonus": Split("param", 0), "ln_x": NORM},
    ChannelMix: {"key": COLUMN, "value": ROW},  # receptance gates the full-width output: replicated
}
"""The split plan, written once: it drives the slicing (:func:`shard_model`), the layer swap
(:func:`parallelize`), the split dimensions (:func:`split_dims`) and tools/scaling.py's all-reduce count."""


def _plan(module: nn.Module) -> dict[str, Split]:
    return next((table for kind, table in PLAN.items() if isinstance(module, kind)), {})


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
        for layer, split in _plan(module).items():
            dims.update({f"{prefix}.{name}": dim for name, dim in split.parameters(layer).items()})
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
    for module in list(model.modules()):
        for name, split in _plan(module).items():
            setattr(module, name, _slice(getattr(module, name), split, rank, size))
        if isinstance(module, TimeMix):
            module.num_heads //= size
    return model


def _slice(layer: nn.Module | nn.Parameter, split: Split, rank: int, size: int) -> nn.Module | nn.Parameter:
    if split.kind in ("column", "row"):
        return _sliced_linear(layer, split.dim, rank, size)
    if split.kind == "norm":
        local = nn.GroupNorm(layer.num_groups // size, layer.num_channels // size, eps=layer.eps,
                             device=layer.weight.device, dtype=layer.weight.dtype)
        local.weight = nn.Parameter(_chunk(layer.weight, split.dim, rank, size))
        local.bias = nn.Parameter(_chunk(layer.bias, split.dim, rank, size))
        return local
    return nn.Parameter(_chunk(layer, split.dim, rank, size))


def parallelize(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Make ``model`` (the full plain model, identical on every rank) this rank's tensor-parallel
    part: sliced weights, megatron-core layers, split parameters marked. A no-op for TP = 1."""
    if groups.tensor_parallel == 1:
        return model
    from rwkvclip_dist.parallel.megatron_layers import column_parallel, mark_split, row_parallel, \
        tensor_parallel_time_mix

    size, group = groups.tensor_parallel, groups.tp_group
    shard_model(model, groups.tp_rank, size)
    swap = {"column": column_parallel, "row": row_parallel}
    for module in list(model.modules()):
        for name, split in _plan(module).items():
            if split.kind in swap:
                setattr(module, name, swap[split.kind](getattr(module, name), size, group))
            else:
                for param, dim in split.parameters(name).items():
                    mark_split(module.get_parameter(param), dim)
        if isinstance(module, TimeMix):
            tensor_parallel_time_mix(module, group)
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
