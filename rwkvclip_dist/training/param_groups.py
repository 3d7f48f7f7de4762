"""Per-parameter learning-rate scale and weight decay: layer-wise decay per tower and recipe rules.

``optimizer.layer_decay: {image: d, text: d}`` is open_clip's (and BEiT's) layer-wise lr decay, per
tower: with ``L`` blocks, the embeddings (patch / token embedding, position embedding, class token)
are layer 0, block ``i`` is layer ``i + 1``, the final norm and the projection layer ``L + 1``, and
a parameter of layer ``l`` trains at ``lr x d ** (L + 1 - l)``. Parameters outside the towers
(``logit_scale``) train at the full lr. 1.0 (the default) turns it off.

``optimizer.groups: [{match, lr_scale, weight_decay}]`` then applies the first rule whose regular
expression ``match`` finds the parameter's name (``re.search``): its lr is further multiplied by
``lr_scale`` and, where the rule gives one, ``weight_decay`` replaces the decay of
``optim.split_decay_groups``. Parameters with the same (lr scale, weight decay) share one AdamW group;
the groups are printed once at start-up.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from rwkvclip_dist.typed_config import FieldError

TOWERS = {"visual": "image", "visual_proj": "image", "text": "text", "text_proj": "text"}
EMBEDDINGS = ("patch_embed", "pos_embed", "class_token", "token_embed")


@dataclass
class LayerDecay:
    image: float = 1.0
    """lr multiplier per block of depth below the image tower's top (1.0: off)."""
    text: float = 1.0

    def __post_init__(self) -> None:
        for name in ("image", "text"):
            if not 0 < getattr(self, name) <= 1:
                raise FieldError(name, f"must be in (0, 1], got {getattr(self, name)}")


@dataclass
class GroupRule:
    match: str
    """Regular expression searched in the parameter name, e.g. '^text\\.' or 'logit_scale'."""
    lr_scale: float = 1.0
    weight_decay: float | None = None
    """Replaces the default decay of the matched parameters (None: keep it)."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.match)
        except re.error as err:
            raise FieldError("match", f"{self.match!r} is not a regular expression: {err}") from None
        if not self.lr_scale >= 0:
            raise FieldError("lr_scale", f"must be >= 0, got {self.lr_scale}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise FieldError("weight_decay", f"must be >= 0, got {self.weight_decay}")


def layer_id(name: str, depth: int) -> int:
    """The layer of a tower parameter for layer-wise decay (see the module docstring)."""
    parts = name.split(".")
    if parts[0].endswith("_proj"):
        return depth + 1
    if parts[1] in EMBEDDINGS:
        return 0
    if parts[1] == "blocks":
        return int(parts[2]) + 1
    return depth + 1  # ln_out


def lr_scale_of(name: str, layer_decay: LayerDecay, depths: dict[str, int]) -> float:
    tower = TOWERS.get(name.split(".")[0])
    if tower is None:
        return 1.0
    decay, depth = getattr(layer_decay, tower), depths[tower]
    return decay ** (depth + 1 - layer_id(name, depth))


def plan_groups(model: nn.Module, decayed: list[tuple[str, nn.Parameter]], not_decayed: list[tuple[str, nn.Parameter]],
                weight_decay: float, layer_decay: LayerDecay, rules: list[GroupRule]) -> list[dict]:
    """AdamW parameter groups (``params``, ``lr_scale``, ``weight_decay``, ``name``) for the
    already decay-split parameters; without layer decay and rules these are the two groups
    ``decay`` and ``no_decay``, in that order."""
    depths = {"image": len(model.visual.blocks), "text": len(model.text.blocks)}
    compiled = [(re.compile(rule.match), rule) for rule in rules]
    groups: dict[tuple[float, float], dict] = {}
    tagged = [(n, p, weight_decay) for n, p in decayed] + [(n, p, 0.0) for n, p in not_decayed]
    for name, param, wd in tagged:
        scale = lr_scale_of(name, layer_decay, depths)
        label = "decay" if wd else "no_decay"
        for pattern, rule in compiled:
            if pattern.search(name):
                scale *= rule.lr_scale
                wd = wd if rule.weight_decay is None else rule.weight_decay
                label = f"/{rule.match}/"
                break
        key = (round(scale, 12), wd)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd,
                                        "name": label})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def describe_groups(groups: list[dict], lr: float) -> str:
    """The start-up table: one line per group (what it holds, how many tensors and values, lr, wd)."""
    lines = [f"optimizer groups ({len(groups)}):", f"  {'group':<24}{'tensors':>8}{'values':>12}{'lr':>11}{'wd':>8}  first"]
    for g in groups:
        values = sum(p.numel() for p in g["params"])
        lines.append(f"  {g['name']:<24}{len(g['params']):>8}{values:>12}{lr * g['lr_scale']:>11.3g}"
                     f"{g['weight_decay']:>8.3g}  {g['names'][0]}")
    return "\n".join(lines)
