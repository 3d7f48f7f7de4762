"""``model.lock``: frozen towers (LiT's locked image tower, open_clip's ``--lock-image`` / ``--lock-text``).

A locked parameter has ``requires_grad=False`` before the optimizer and the DeepSpeed engine are
built, so it is in no optimizer group, ZeRO keeps no fp32 master, moments or gradient partition for
it, and autograd never allocates its gradient. ``unlocked_blocks: N`` keeps the last N blocks of the
tower trainable, with the tower's final norm and projection (open_clip's "unlocked groups": the top
of the tower). ``norms_trainable`` keeps every LayerNorm / GroupNorm of the locked part trainable
(open_clip's ``--lock-text-freeze-layer-norm`` is the opposite default).

A locked block runs in eval mode even while the model trains: stochastic depth would otherwise
drop paths of a tower whose weights never adapt to it (a forward pre-hook, since the trainer and the
evaluations switch the whole model between train and eval).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from rwkvclip_dist.typed_config import FieldError

log = logging.getLogger(__name__)

# tower -> (its module, its projection) in RWKVCLIP
TOWER_MODULES = {"image": ("visual", "visual_proj"), "text": ("text", "text_proj")}


@dataclass
class TowerLock:
    locked: bool = False
    """Freeze this tower (and its projection)."""
    unlocked_blocks: int = 0
    """Keep the last N blocks, the final norm and the projection trainable."""
    norms_trainable: bool = False
    """Keep the norms of the locked part trainable."""

    def __post_init__(self) -> None:
        if self.unlocked_blocks < 0:
            raise FieldError("unlocked_blocks", f"must be >= 0, got {self.unlocked_blocks}")


@dataclass
class LockSection:
    """The ``model.lock:`` section of a recipe."""

    image: TowerLock = field(default_factory=TowerLock)
    text: TowerLock = field(default_factory=TowerLock)


def _locked_modules(model: nn.Module, tower: str, lock: TowerLock) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose parameters the lock freezes."""
    tower_name, proj_name = TOWER_MODULES[tower]
    trunk = getattr(model, tower_name)
    depth = len(trunk.blocks)
    if lock.unlocked_blocks > depth:
        raise FieldError(f"lock.{tower}.unlocked_blocks", f"{lock.unlocked_blocks} exceeds the tower's {depth} blocks")
    if lock.unlocked_blocks == 0:
        modules = [(tower_name, trunk)]
        if getattr(model, proj_name) is not None:
            modules.append((proj_name, getattr(model, proj_name)))
        return modules
    kept_blocks = {f"blocks.{i}" for i in range(depth - lock.unlocked_blocks, depth)}
    modules = []
    for name, child in trunk.named_children():
        if name == "blocks":
            modules += [(f"{tower_name}.blocks.{i}", b) for i, b in enumerate(child) if f"blocks.{i}" not in kept_blocks]
        elif name != "ln_out":
            modules.append((f"{tower_name}.{name}", child))
    # Parameters held directly by the tower (position embedding, class token).
    modules.append((tower_name, _DirectParameters(trunk)))
    return modules


class _DirectParameters:
    """The parameters a module holds itself (not through children), with ``named_parameters``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def named_modules(self):
        yield "", self

    def named_parameters(self, recurse: bool = False):
        return self.module.named_parameters(recurse=False)


def apply_lock(model: nn.Module, section: LockSection) -> list[str]:
    """Freeze what ``section`` asks for; returns the frozen parameter names (logged once)."""
    frozen: list[str] = []
    for tower in ("image", "text"):
        lock: TowerLock = getattr(section, tower)
        if not lock.locked:
            continue
        for prefix, module in _locked_modules(model, tower, lock):
            for sub_name, sub in module.named_modules():
                keep = lock.norms_trainable and isinstance(sub, (nn.LayerNorm, nn.GroupNorm))
                for leaf, param in sub.named_parameters(recurse=False):
                    if not keep:
                        param.requires_grad_(False)
                        frozen.append(".".join(p for p in (prefix, sub_name, leaf) if p))
            if isinstance(module, nn.Module):
                module.register_forward_pre_hook(_eval_mode)
        count = sum(1 for name in frozen if name.startswith(TOWER_MODULES[tower]))
        log.info("model.lock.%s: %d parameter tensors frozen (last %d blocks unlocked, norms %s)", tower, count,
                 lock.unlocked_blocks, "trainable" if lock.norms_trainable else "frozen")
    return frozen


def _eval_mode(module: nn.Module, _args) -> None:
    if module.training:
        module.eval()
