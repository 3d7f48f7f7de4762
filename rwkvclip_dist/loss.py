"""Contrastive losses over the global batch: CLIP's symmetric InfoNCE and the SigLIP sigmoid loss.

Both take L2-normalised features ``[B, D]`` of this rank and the (exp'd) logit scale, gather the
other ranks' features through ``parallel.collectives``, and return this rank's loss. The data-parallel
mean of that loss (which DeepSpeed's gradient averaging applies) is the loss of one process holding
the concatenated batch, and with ``gather_with_grad`` so is its gradient, for every parameter.

``local_loss`` scores only this rank's rows against all columns: memory ``B x global B`` instead of
``global B x global B``, same mean and gradient. Without ``gather_with_grad`` the other ranks' copies
of this rank's features carry no gradient back, so the gradient misses the terms in which this rank's
features serve as other ranks' negatives (open_clip's cheaper approximation); keep it on for
exactness.

``valid`` (bool ``[B]`` per rank, optional) leaves samples out of the loss without changing the batch
shape: a stand-in the data loader put in place of an undecodable sample (a copy of a neighbouring
pair, which would otherwise be a false negative of its original) is neither a row nor a column of the
logits, and the loss is normalised by the number of valid rows over all ranks. Loss and gradients then
equal those of the batch without the stand-ins; with every sample valid the computation is the
unmasked one, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.parallel import collectives


@dataclass
class LossSection:
    """The ``loss:`` section of a recipe."""

    kind: Literal["clip", "siglip"] = "clip"
    """'clip': symmetric InfoNCE over the global batch; 'siglip': pairwise sigmoid loss."""
    local_loss: bool = True
    """Each rank computes logits for its own rows only against all columns (memory O(B x global B))."""
    gather_with_grad: bool = True
    """All-gather features with gradient; required for the exact global-batch gradient."""
    siglip_bias: float = -10.0
    """Fixed logit bias of the SigLIP loss, used when the model has no learned one (a model with
    ``init_logit_bias`` set, as SigLIP trains, passes its own)."""


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class _GatheringLoss(nn.Module):
    """``group``: the data-parallel process group whose batches form the global batch (default: the
    world). Under tensor parallelism the ranks of a TP group hold the same batch, so only the
    data-parallel group is gathered over."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True,
                 rank: int | None = None, world_size: int | None = None, group=None) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group
        self.rank = collectives.rank(group) if rank is None else rank
        self.world_size = collectives.world_size(group) if world_size is None else world_size

    def gather_valid(self, valid: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
        """Every rank's validity flags (None when all samples of all ranks are valid)."""
        if valid is None:
            valid = torch.ones(rows, dtype=torch.bool, device=device)
        if valid.shape != (rows,):
            raise ValueError(f"valid must have shape ({rows},), got {tuple(valid.shape)}")
        everyone = collectives.all_gather_constant(valid.to(torch.uint8), self.group).bool().to(device)
        return None if bool(everyone.all()) else everyone

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return features
        if self.gather_with_grad:
            return collectives.all_gather_with_grad(features, self.group)
        return collectives.all_gather_no_grad(features, self.group)


class ClipLoss(_GatheringLoss):
    """Symmetric cross-entropy of image->text and text->image logits (InfoNCE)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must have the same shape")
        rows = image_features.shape[0]
        valid_all = self.gather_valid(valid, rows, image_features.device) if valid is not None else None
        all_image = self.gather(image_features)
        all_text = self.gather(text_features)
        if valid_all is not None:
            return self._masked(image_features, text_features, all_image, all_text, logit_scale, valid_all)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(rows, device=image_features.device) + rows * self.rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        # Float32 logits: bf16 cross-entropy over thousands of negatives loses the small terms.
        return 0.5 * (F.cross_entropy(_at_least_fp32(logits_per_image), labels)
                      + F.cross_entropy(_at_least_fp32(logits_per_text), labels))

    def _masked(self, image_features, text_features, all_image, all_text, logit_scale, valid_all):
        if not self.local_loss:
            # Every rank computes the whole (identical) loss: simply leave the stand-ins out.
            image, text = all_image[valid_all], all_text[valid_all]
            logits = _at_least_fp32(logit_scale * image @ text.T)
            labels = torch.arange(image.shape[0], device=image.device)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        rows = image_features.shape[0]
        mine = valid_all[rows * self.rank: rows * (self.rank + 1)]
        labels = (torch.arange(rows, device=image_features.device) + rows * self.rank)[mine]
        # Stand-in columns get -inf: no probability mass, no gradient.
        logits_per_image = _at_least_fp32(logit_scale * image_features[mine] @ all_text.T).masked_fill(~valid_all, -torch.inf)
        logits_per_text = _at_least_fp32(logit_scale * text_features[mine] @ all_image.T).masked_fill(~valid_all, -torch.inf)
        total = (F.cross_entropy(logits_per_image, labels, reduction="sum")
                 + F.cross_entropy(logits_per_text, labels, reduction="sum"))
        # The mean over ranks (DeepSpeed's gradient average) must be the mean over valid rows.
        return 0.5 * total * self.world_size / valid_all.sum()


class SigLipLoss(_GatheringLoss):
    """Pairwise sigmoid loss: every (image, text) pair is a binary match / no-match decision.

    The bias is the model's learned ``logit_bias`` when it has one (``init_logit_bias``, as SigLIP),
    else the fixed recipe constant; the scale is the model's logit_scale.
    Normalised per image as in SigLIP: the sum over all pairs of a row, averaged over rows.
    """

    def __init__(self, bias: float = -10.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bias = bias

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, valid: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = image_features.shape[0]
        valid_all = self.gather_valid(valid, rows, image_features.device) if valid is not None else None
        all_text = self.gather(text_features)
        if self.local_loss or self.world_size == 1:
            images, offset = image_features, rows * self.rank if self.world_size > 1 else 0
        else:
            images, offset = self.gather(image_features), 0
        logits = _at_least_fp32(logit_scale * images @ all_text.T) + (self.bias if logit_bias is None else logit_bias)
        signs = -torch.ones_like(logits)
        idx = torch.arange(images.shape[0], device=logits.device)
        signs[idx, idx + offset] = 1.0
        if valid_all is None:
            return -F.logsigmoid(signs * logits).sum(dim=1).mean()
        row_valid = valid_all[offset: offset + images.shape[0]]
        # Stand-ins are neither rows nor columns: their pair terms are dropped from every row's sum.
        per_row = -(F.logsigmoid(signs * logits) * valid_all).sum(dim=1)
        total = per_row[row_valid].sum()
        ranks_sharing = self.world_size if images.shape[0] < valid_all.shape[0] else 1
        return total * ranks_sharing / valid_all.sum()


def build_loss(section: LossSection, group=None) -> _GatheringLoss:
    """The loss a recipe's ``loss:`` section names (its ``kind`` was checked when the recipe loaded),
    over the global batch of the data-parallel ``group`` (default: the world)."""
    common = {"local_loss": section.local_loss, "gather_with_grad": section.gather_with_grad, "group": group}
    if section.kind == "siglip":
        return SigLipLoss(bias=section.siglip_bias, **common)
    return ClipLoss(**common)
