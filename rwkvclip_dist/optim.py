"""AdamW parameter groups: which parameters get weight decay.

By default no decay on the parameters that are not weight matrices in the usual sense: norm weights
and biases, every bias, the token-mix vectors (``maa_*`` of shape [1, 1, C]), the per-channel decays,
the per-head bonus ``u``, the position and token embeddings and ``logit_scale``. The LoRA matrices of
the token mix and of the decay (``maa_w1``, ``decay_w1``...) are ordinary weights and keep decay.
``decay_everything`` reproduces the paper's choice of decaying every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Parameter names (last component) that are vectors or tables in disguise: decaying them pulls
# learned mixing ratios, decays and bonuses towards 0, which has no regularising meaning.
NO_DECAY_NAMES = frozenset({"bonus", "pos_embed", "class_token", "logit_scale", "decay"})
NO_DECAY_PREFIXES = ("maa_",)
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)
LORA_SUFFIXES = ("_w1", "_w2")


@dataclass
class ParamGroups:
    decay: list[tuple[str, nn.Parameter]]
    no_decay: list[tuple[str, nn.Parameter]]


def _is_no_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith(LORA_SUFFIXES):
        return False
    if isinstance(module, NO_DECAY_MODULES) or leaf == "bias":
        return True
    if leaf in NO_DECAY_NAMES or leaf.startswith(NO_DECAY_PREFIXES):
        return True
    # Any other parameter with at most one non-singleton dimension is a vector (a gain, a shift...).
    return sum(1 for size in param.shape if size > 1) <= 1


def split_decay_groups(model: nn.Module, decay_everything: bool = False) -> ParamGroups:
    """Partition the trainable parameters of ``model`` into decayed and non-decayed ones."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            if not decay_everything and _is_no_decay(name, param, module):
                no_decay.append((name, param))
            else:
                decay.append((name, param))
    return ParamGroups(decay, no_decay)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] | list[float],
                    eps: float, decay_everything: bool = False) -> torch.optim.AdamW:
    """torch.optim.AdamW over two groups; each group also records its ``base_lr`` for the schedule."""
    if len(betas) != 2:
        raise ValueError(f"optimizer.betas must have two values, got {list(betas)}")
    groups = split_decay_groups(model, decay_everything)
    param_groups = [
        {"params": [p for _, p in groups.decay], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for _, p in groups.no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    # foreach=False: the multi-tensor path gives no speed on CPU and differs bitwise between versions.
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)
