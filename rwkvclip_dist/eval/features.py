"""Frozen-feature extraction, sharded over ranks and gathered, so each data set is encoded once.

Every rank encodes a contiguous slice of the data set (:func:`padded_shard`: equal forward counts
on every rank, padding discarded) and the slices are gathered into place, so the result is
identical on every rank and contains each sample exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rwkvclip_dist.eval.distributed import all_gather_rows, padded_shard, rank
from rwkvclip_dist.eval.progress import progress
from rwkvclip_dist.eval.zeroshot import model_device, model_dtype

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    batch_size: int = 64
    """Images per forward pass."""
    num_workers: int = 2
    """DataLoader worker processes for image decoding."""


@torch.no_grad()
def image_features(
    model: nn.Module,
    dataset: Dataset,
    loader: LoaderConfig | None = None,
    device: torch.device | str | None = None,
    normalize: bool = True,
    desc: str = "image features",
    dtype: torch.dtype | None = None,
    on_unreadable: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float32, labels [N] long)`` of the whole ``dataset`` on every rank.

    A data set whose items are ``(image, label, readable)`` (:class:`~rwkvclip_dist.eval.datasets.SkipUnreadable`)
    has its unreadable images left out of both; ``on_unreadable`` receives their number.

    Images are cast to ``dtype`` (default: the model's parameter dtype, e.g. bf16 inside a bf16
    training engine); features are returned in float32 either way."""
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the data set is empty")
    loader = loader or LoaderConfig()
    device = torch.device(device) if device is not None else model_device(model)
    dtype = dtype or model_dtype(model)
    was_training = model.training
    model.eval()
    indices, n_real = padded_shard(len(dataset))
    data = DataLoader(
        Subset(dataset, indices),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=device.type == "cuda",
    )
    feats, labels, readable = [], [], []
    for images, targets, *ok in progress(data, desc=desc, disable=rank() != 0):
        out = model.encode_image(images.to(device, dtype)).float()
        feats.append(F.normalize(out, dim=-1) if normalize else out)
        labels.append(torch.as_tensor(targets).to(device).long())
        readable.append(ok[0].to(device).long() if ok else torch.ones(len(out), dtype=torch.long, device=device))
    model.train(was_training)
    local_feats, local_labels = torch.cat(feats)[:n_real], torch.cat(labels)[:n_real]
    feats, labels = all_gather_rows(local_feats, len(dataset)), all_gather_rows(local_labels, len(dataset))
    keep = all_gather_rows(torch.cat(readable)[:n_real], len(dataset)).bool()
    # A data set that marks unreadable images (SkipUnreadable) has them left out here and counted.
    skipped = int((~keep).sum())
    if skipped == len(dataset):
        raise ValueError(f"{desc}: none of the {skipped} images could be read")
    if skipped:
        log.warning("%s: %d of %d images could not be read and are left out", desc, skipped, len(dataset))
    if on_unreadable is not None:
        on_unreadable(skipped)
    return (feats[keep], labels[keep]) if skipped else (feats, labels)
