"""Classification counts shared by zero-shot and the linear probe: top-1/top-5 and mean-per-class.

Counts (not accuracies) are what ranks exchange, so an all-reduce of the vector of
:func:`confusion_counts` followed by :func:`summarise_counts` gives exact global metrics.
"""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[B]``: whether each label is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def confusion_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[correct_top1, correct_top5, n, hits per class..., totals per class...]``."""
    n_classes = logits.shape[1]
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)].tolist()
        raise ValueError(f"labels {bad[:5]} are outside the classifier's {n_classes} classes")
    counts = torch.zeros(3 + 2 * n_classes, dtype=torch.float64, device=logits.device)
    hit1 = topk_correct(logits, labels, 1)
    counts[0] = hit1.sum()
    counts[1] = topk_correct(logits, labels, 5).sum()
    counts[2] = labels.numel()
    counts[3 : 3 + n_classes].index_add_(0, labels, hit1.double())
    counts[3 + n_classes :].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    return counts


def summarise_counts(counts: torch.Tensor, n_classes: int) -> dict[str, float | int | None]:
    n = int(counts[2].item())
    if n == 0:
        raise ValueError("zero-shot evaluation saw no images (empty dataloader on every rank)")
    hits, totals = counts[3 : 3 + n_classes], counts[3 + n_classes :]
    present = totals > 0
    return {
        "top1": float(counts[0] / n),
        "top5": float(counts[1] / n) if n_classes > 5 else None,
        "mean_per_class": float((hits[present] / totals[present]).mean()),
        "n": n,
    }
