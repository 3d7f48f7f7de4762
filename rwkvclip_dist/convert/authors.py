"""The authors' released RWKV-CLIP state-dict layout (SPEC section 10) <-> ours.

Mapping rules:
- key names are renamed tower by tower (``image_model.layers.i`` <-> ``visual.blocks.i``, ...);
- the authors' image channel mix stores the complementary lerp ``x*a + shift(x)*(1-a)``; ours is
  ``x + (shift(x)-x)*m``, so ``m = 1 - a``. That subtraction is done in float64 and the authors'
  side is written in float64 by default, which makes ours -> authors -> ours bit-exact (for every
  |m| >= 2**-29, i.e. any value a trained lerp takes; :func:`to_authors` reports any exception);
- the authors keep the text towers' ``time_decay`` and ``time_faaaa`` in bf16; we hold them in fp32
  (bf16 -> fp32 is exact). ``released_dtypes=True`` writes them back in bf16 and the rest in fp32,
  like the released files, which rounds.
"""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger(__name__)

# (authors' name, our name) inside one block's time mix; identical in both towers.
_TIME_MIX = [(f"time_maa_{z}", f"maa_{z}") for z in "xwkvrg"] + [
    ("time_maa_w1", "maa_w1"), ("time_maa_w2", "maa_w2"), ("time_decay", "decay"),
    ("time_decay_w1", "decay_w1"), ("time_decay_w2", "decay_w2"), ("time_faaaa", "bonus"),
] + [(f"{n}.weight", f"{n}.weight") for n in ("key", "value", "receptance", "gate", "output")] + [
    ("ln_x.weight", "ln_x.weight"), ("ln_x.bias", "ln_x.bias")]
_CHANNEL_MIX = [(f"{n}.weight", f"{n}.weight") for n in ("key", "receptance", "value")]
_IMAGE_LERPS = [("spatial_mix_k", "maa_k"), ("spatial_mix_r", "maa_r")]
_TEXT_LERPS = [("time_maa_k", "maa_k"), ("time_maa_r", "maa_r")]
_TOWERS = {
    # tower: (authors' prefix, our prefix, authors' block list, our block list, channel-mix lerps,
    #         authors' final norm, our final norm, fixed keys)
    "image": ("image_model.", "visual.", "layers", "blocks", _IMAGE_LERPS, "ln1", "ln_out",
              [("patch_embed.projection.weight", "patch_embed.weight"),
               ("patch_embed.projection.bias", "patch_embed.bias"), ("pos_embed", "pos_embed")]),
    "text": ("text_model.", "text.", "blocks", "blocks", _TEXT_LERPS, "ln_out", "ln_out",
             [("emb.weight", "token_embed.weight")]),
}
_TEXT_BF16 = re.compile(r"^text_model\.blocks\.\d+\.att\.(time_decay|time_faaaa)$")
# What the authors' code fixes rather than reads from the weights (reference_forward.py computes the
# same): a model of ours that sets another value computes something their code does not.
AUTHORS_FIXED = {"image.pool": "mean", "image.layer_norm_eps": 1e-5, "image.group_norm_eps": 1e-5,
                 "text.pool": "paper", "text.layer_norm_eps": 1e-5, "text.group_norm_eps": 1e-5 * 8**2,
                 "text.end_token_id": 49407}


def unrepresentable(config) -> dict[str, object]:
    """``{dotted key: value}`` of the settings of ``config`` (a ModelConfig) that the authors' layout
    cannot carry: loading the converted file with their code would silently use their fixed value."""
    found = {}
    for dotted, theirs in AUTHORS_FIXED.items():
        tower, name = dotted.split(".")
        ours = getattr(getattr(config, tower), name)
        if ours != theirs and not (isinstance(theirs, float) and abs(ours - theirs) <= 1e-12):
            found[dotted] = ours
    return found


def key_map(image_depth: int, text_depth: int) -> list[tuple[str, str, bool]]:
    """``(authors' key, our key, complementary lerp?)`` for every parameter of both towers."""
    rows = [("logit_scale", "logit_scale", False)]
    for tower, depth in (("image", image_depth), ("text", text_depth)):
        theirs, ours, t_blocks, o_blocks, lerps, t_norm, o_norm, fixed = _TOWERS[tower]
        rows += [(theirs + a, ours + b, False) for a, b in fixed]
        for i in range(depth):
            tb, ob = f"{theirs}{t_blocks}.{i}.", f"{ours}{o_blocks}.{i}."
            norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
            rows += [(f"{tb}{n}.{p}", f"{ob}{n}.{p}", False) for n in norms for p in ("weight", "bias")]
            rows += [(f"{tb}att.{a}", f"{ob}att.{b}", False) for a, b in _TIME_MIX]
            rows += [(f"{tb}ffn.{a}", f"{ob}ffn.{b}", False) for a, b in _CHANNEL_MIX]
            rows += [(f"{tb}ffn.{a}", f"{ob}ffn.{b}", tower == "image") for a, b in lerps]
        rows += [(f"{theirs}{t_norm}.{p}", f"{ours}{o_norm}.{p}", False) for p in ("weight", "bias")]
    return rows


def infer_depths(authors_state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Block counts of both towers from the key names of an authors' state dict."""
    depths = []
    for pattern in (r"^image_model\.layers\.(\d+)\.", r"^text_model\.blocks\.(\d+)\."):
        found = {int(m.group(1)) for k in authors_state if (m := re.match(pattern, k))}
        depths.append(max(found) + 1 if found else 0)
    return depths[0], depths[1]


def _complement(t: torch.Tensor) -> torch.Tensor:
    return 1.0 - t.double()


def from_authors(authors_state: dict[str, torch.Tensor], image_depth: int, text_depth: int) -> dict[str, torch.Tensor]:
    """Our fp32 state dict from an authors' one (prefixes already stripped). Unknown authors' keys
    are passed through unchanged so that the caller's key check lists them as unexpected."""
    state: dict[str, torch.Tensor] = {}
    mapped = set()
    for theirs, ours, complementary in key_map(image_depth, text_depth):
        if theirs not in authors_state:
            continue
        value = authors_state[theirs]
        state[ours] = (_complement(value) if complementary else value).float()
        mapped.add(theirs)
    state.update({k: v for k, v in authors_state.items() if k not in mapped})
    return state


def to_authors(state: dict[str, torch.Tensor], image_depth: int, text_depth: int,
               released_dtypes: bool = False) -> dict[str, torch.Tensor]:
    """The authors' layout of our state dict (see the module docstring for dtypes)."""
    out: dict[str, torch.Tensor] = {}
    inexact = []
    for theirs, ours, complementary in key_map(image_depth, text_depth):
        if ours not in state:
            raise KeyError(f"our state dict lacks {ours!r} (needed for the authors' {theirs!r})")
        value = state[ours]
        if complementary:
            value = _complement(value)
            if not torch.equal(_complement(value).float(), state[ours].float()):
                inexact.append(ours)
        if released_dtypes:
            value = value.to(torch.bfloat16 if _TEXT_BF16.match(theirs) else torch.float32)
        out[theirs] = value.clone()
    extra = sorted(set(state) - {ours for _, ours, _ in key_map(image_depth, text_depth)})
    if extra:
        raise KeyError(f"the authors' layout has no place for {extra} (class token or projections?)")
    if inexact:
        log.warning("lerps with |m| < 2**-29 do not round-trip bit-exactly: %s", inexact)
    return out
