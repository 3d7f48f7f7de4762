"""megatron-core's tensor-parallel layers, holding weights that ``tensor_parallel.shard_model`` sliced.

The only module that imports megatron-core's layers. They are built with ``use_cpu_initialization``
and without initialisation (the weights come from the plain model, so every TP size starts from the
same full weights), and with gradient-accumulation fusion off: that fusion writes into Megatron's
own ``main_grad`` buffers, while here DeepSpeed owns the gradients. apex, where installed, is what
megatron-core would use for that fusion; nothing here needs it.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from rwkvclip_dist.model.mixing import TimeMix


def _config(size: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=size, use_cpu_initialization=True, params_dtype=dtype,
                               perform_initialization=False, gradient_accumulation_fusion=False)


def mark_split(param: nn.Parameter, dim: int) -> None:
    """Mark a parameter as split across the TP group (DeepSpeed then counts it on every TP rank in
    the gradient norm; a replicated parameter counts on TP rank 0 only)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


@functools.cache
def _column_class():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        """Column-parallel linear that returns the output tensor alone, as ``nn.Linear`` does."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_)[0]

    return ColumnParallel


@functools.cache
def _row_class():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallel(RowParallelLinear):
        """Row-parallel linear (input split, output all-reduced) that returns the output tensor alone."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_)[0]

    return RowParallel


def _with_weight(layer: nn.Module, shard: nn.Linear, dim: int) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(shard.weight)
    layer.weight.requires_grad_(shard.weight.requires_grad)
    mark_split(layer.weight, dim)
    return layer


def column_parallel(shard: nn.Linear, size: int, group) -> nn.Module:
    """A column-parallel layer holding ``shard`` (this rank's rows of the full weight)."""
    layer = _column_class()(shard.in_features, shard.out_features * size, config=_config(size, shard.weight.dtype),
                            init_method=None, bias=False, gather_output=False, tp_group=group)
    return _with_weight(layer, shard, 0)


def row_parallel(shard: nn.Linear, size: int, group) -> nn.Module:
    """A row-parallel layer holding ``shard`` (this rank's columns of the full weight)."""
    layer = _row_class()(shard.in_features * size, shard.out_features, config=_config(size, shard.weight.dtype),
                         init_method=None, bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=group)
    return _with_weight(layer, shard, 1)


class TensorParallelTimeMix(TimeMix):
    """A time mix holding its TP rank's heads. Differs from :class:`TimeMix` only where the replicated
    decay-LoRA hidden layer meets the output-split second matrix."""

    tp_group = None

    def decay_lora(self, x_w: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        hidden = torch.tanh(x_w @ self.decay_w1)
        # Each rank's backward sees only its own decay channels: the all-reduce makes the gradient
        # of the replicated hidden layer (and everything before it) the full one on every rank.
        return copy_to_tensor_model_parallel_region(hidden, group=self.tp_group) @ self.decay_w2


def tensor_parallel_time_mix(module: TimeMix, group) -> None:
    """Turn a sharded ``module`` into a :class:`TensorParallelTimeMix` in place (its parameters and
    their names stay; only the class changes, as FSDP2's ``fully_shard`` does)."""
    module.__class__ = TensorParallelTimeMix
    module.tp_group = group
