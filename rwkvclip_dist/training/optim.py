"""The optimizer: AdamW over parameter groups (which parameters get weight decay, at which lr).

By default no decay on the parameters that are not weight matrices in the usual sense: norm weights
and biases, every bias, the token-mix vectors (``maa_*`` of shape [1, 1, C]), the per-channel decays,
the per-head bonus ``u``, the position and token embeddings and ``logit_scale``. The LoRA matrices of
the token mix and of the decay (``maa_w1``, ``decay_w1``...) are ordinary weights and keep decay.
``decay_everything`` reproduces the paper's choice of decaying every parameter. Layer-wise lr decay
and the recipe's own group rules (``optimizer.layer_decay``, ``optimizer.groups``) split the groups
further (``training/param_groups.py``); frozen parameters (``model.lock``) are in none.

On a GPU the update runs as torch's fused AdamW (one kernel over all tensors of a group instead of a
loop of small kernels per parameter); on CPU as the plain per-parameter loop. Both compute the same
update (tested against each other on CPU). ``impl: apex`` takes apex's FusedAdam (AdamW mode) where
apex is installed; nothing requires apex. Under ZeRO-Offload (``parallel.offload_optimizer: cpu``)
the update runs on the host in DeepSpeed's CPU Adam, with the same groups and the same AdamW maths
(tested against torch's AdamW).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from rwkvclip_dist.training.param_groups import GroupRule, LayerDecay, describe_groups, plan_groups
from rwkvclip_dist.typed_config import FieldError

log = logging.getLogger(__name__)
APEX_HOWTO = ("apex is not on the package index: build it from source (https://github.com/NVIDIA/apex#from-source, "
              "pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
              "--config-settings '--build-option=--cuda_ext' git+https://github.com/NVIDIA/apex) or use a "
              "container that ships it (NGC PyTorch), or set optimizer.impl to auto")

# Parameter names (last component) that are vectors or tables in disguise: decaying them pulls
# learned mixing ratios, decays and bonuses towards 0, which has no regularising meaning.
NO_DECAY_NAMES = frozenset({"bonus", "pos_embed", "class_token", "logit_scale", "logit_bias", "decay"})
NO_DECAY_PREFIXES = ("maa_",)
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)
LORA_SUFFIXES = ("_w1", "_w2")


@dataclass
class OptimizerSection:
    """The ``optimizer:`` section of a recipe."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    decay_everything: bool = False
    """Paper option: weight decay on every parameter. Default: none on norms, biases, token-mix
    vectors, decays, bonus, embeddings and logit_scale."""
    layer_decay: LayerDecay = field(default_factory=LayerDecay)
    """Layer-wise lr decay per tower, ``{image: 0.75, text: 1.0}`` (``training/param_groups.py``)."""
    groups: list[GroupRule] = field(default_factory=list)
    """``[{match: REGEX, lr_scale: X, weight_decay: Y}]``: the first matching rule scales a
    parameter's lr and may replace its weight decay (``training/param_groups.py``)."""
    impl: Literal["auto", "fused", "torch", "apex"] = "auto"
    """'fused': torch's fused AdamW kernels; 'torch': the per-parameter loop; 'auto': fused on GPUs;
    'apex': apex's FusedAdam in AdamW mode (GPU only; an error at load where apex is not installed)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise FieldError("lr", f"must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise FieldError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"must be two values in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise FieldError("eps", f"must be > 0, got {self.eps}")
        if not self.grad_clip >= 0:
            raise FieldError("grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.impl == "apex" and not apex_available():
            raise FieldError("impl", f"'apex' asks for apex's FusedAdam, but apex is not installed here. {APEX_HOWTO}")


def apex_available() -> bool:
    """Whether ``import apex`` can work (the package is found; its CUDA extensions load at use)."""
    return importlib.util.find_spec("apex") is not None


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


def build_optimizer(model: nn.Module, section: OptimizerSection, device: torch.device,
                    offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the two groups of :func:`split_decay_groups`: torch's, fused on ``device`` when the
    section's ``impl`` asks for it (``auto``: on CUDA); apex's FusedAdam for ``impl: apex``; DeepSpeed's
    CPU Adam when ``offload`` (ZeRO-Offload keeps the optimizer states in host memory)."""
    groups = split_decay_groups(model, section.decay_everything)
    planned = plan_groups(model, groups.decay, groups.no_decay, section.weight_decay, section.layer_decay,
                          section.groups)
    log.info("%s", describe_groups(planned, section.lr))
    param_groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "name": g["name"],
                     "lr": section.lr * g["lr_scale"]} for g in planned]
    common = {"lr": section.lr, "betas": tuple(section.betas), "eps": section.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info("optimizer: DeepSpeed's CPU Adam (AdamW mode) on the host, under ZeRO-Offload")
        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **common)
    if section.impl == "apex":
        # Only reachable where apex is installed (checked at load); tested only on such machines.
        from apex.optimizers import FusedAdam

        log.info("optimizer: apex FusedAdam (AdamW mode)")
        return FusedAdam(param_groups, adam_w_mode=True, **common)
    fused = section.impl == "fused" or (section.impl == "auto" and device.type == "cuda")
    log.info("optimizer: torch AdamW, %s (apex %s)", "fused kernels" if fused else "per-parameter loop",
             "installed: optimizer.impl=apex selects its FusedAdam" if apex_available() else "not installed")
    # Unfused: foreach=False, since the multi-tensor path gives no speed on CPU and differs bitwise
    # between torch versions.
    return torch.optim.AdamW(param_groups, **common, foreach=False if not fused else None, fused=fused or None)
