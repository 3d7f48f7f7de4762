"""One optimizer step's forward and backward, with gradient accumulation that is exact for a
contrastive loss.

Summing the losses of K micro-batches gives each sample only its own micro-batch's negatives. Here
the negatives are the whole accumulated batch: a first pass embeds every micro-batch without
gradient; then each micro-batch is re-embedded with gradient and the full loss is formed with the
other micro-batches' cached features. The loss gradient reaches the parameters only through the
fresh micro-batch's features, so the K backward passes sum to exactly the gradient of one batch K
times larger. The RNG state before each micro-batch's first embedding is replayed for its second, so
stochastic depth drops the same paths both times. ``logit_scale`` enters every one of the K losses;
its gradient is scaled by 1/K in each so that the sum counts it once.

Both passes are skipped when the loss is not finite on any rank (all ranks agree by an all-reduce),
and then no backward runs at all, so the optimizer has nothing to apply.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rwkvclip_dist.parallel.collectives import all_reduce_max_flag
from rwkvclip_dist.training.rng import set_torch_streams, torch_streams

Batch = tuple[torch.Tensor, torch.Tensor]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], dict]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], None]


@dataclass
class StepOutput:
    loss: float
    """This rank's loss value (for the local loss, the all-rank mean is the global loss)."""
    finite: bool
    """False when some rank's loss was not finite; no backward ran then."""
    logit_scale: float


def _counted_once(scale: torch.Tensor, parts: int) -> torch.Tensor:
    # Same value as ``scale`` bit for bit; gradient 1/parts of it.
    detached = scale.detach()
    return detached + (scale - detached) / parts


def _bias(out: dict, parts: int = 1) -> dict:
    # A learned SigLIP bias (model.init_logit_bias) enters the loss like the scale, counted once.
    return {} if "logit_bias" not in out else {"logit_bias": _counted_once(out["logit_bias"], parts)}


def contrastive_step(forward: ForwardFn, loss_fn: LossFn, backward: BackwardFn,
                     micro_batches: Sequence[Batch], valid: torch.Tensor | None = None) -> StepOutput:
    """Run the forward and backward passes of one optimizer step over ``micro_batches``.

    ``forward(images, tokens)`` returns the model's dict; ``backward(loss)`` is called once per
    micro-batch (DeepSpeed: ``engine.backward(loss, scale_wrt_gas=False); engine.step()``, which
    applies the optimizer at the step's last micro-batch). ``valid`` flags this rank's samples of the
    whole step (all micro-batches in order) that count in the loss (``loss.py``).
    """
    if not micro_batches:
        raise ValueError("contrastive_step needs at least one micro-batch")
    masked = {} if valid is None else {"valid": valid}
    if len(micro_batches) == 1:
        images, tokens = micro_batches[0]
        out = forward(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], **masked, **_bias(out))
        finite = not all_reduce_max_flag(not math.isfinite(loss.item()))
        if finite:
            backward(loss)
        return StepOutput(loss.item(), finite, out["logit_scale"].item())

    rng_states, image_cache, text_cache = [], [], []
    with torch.no_grad():
        for images, tokens in micro_batches:
            rng_states.append(torch_streams())
            out = forward(images, tokens)
            image_cache.append(out["image_features"])
            text_cache.append(out["text_features"])
        loss_value = loss_fn(torch.cat(image_cache), torch.cat(text_cache), out["logit_scale"], **masked,
                             **_bias(out)).item()
    after_first_pass = torch_streams()
    if all_reduce_max_flag(not math.isfinite(loss_value)):
        return StepOutput(loss_value, False, out["logit_scale"].item())

    parts = len(micro_batches)
    for j, (images, tokens) in enumerate(micro_batches):
        set_torch_streams(rng_states[j])
        out = forward(images, tokens)
        image_features = torch.cat(image_cache[:j] + [out["image_features"]] + image_cache[j + 1:])
        text_features = torch.cat(text_cache[:j] + [out["text_features"]] + text_cache[j + 1:])
        loss = loss_fn(image_features, text_features, _counted_once(out["logit_scale"], parts), **masked,
                       **_bias(out, parts))
        backward(loss)
    set_torch_streams(after_first_pass)
    return StepOutput(loss_value, True, out["logit_scale"].item())


def split_micro_batches(images: torch.Tensor, tokens: torch.Tensor, parts: int) -> list[Batch]:
    """Split one rank's step batch into ``parts`` equal micro-batches."""
    if images.shape[0] % parts:
        raise ValueError(f"batch of {images.shape[0]} does not split into {parts} equal micro-batches")
    return list(zip(images.chunk(parts), tokens.chunk(parts)))
