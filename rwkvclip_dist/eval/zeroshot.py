"""Zero-shot classification: a text classifier built from class names and prompt templates.

``build_zeroshot_classifier`` returns a ``[D, n_classes]`` matrix whose columns are the renormalised
mean of the L2-normalised text embeddings of one class's prompts. ``evaluate_zeroshot`` scores
images against it in float32 (logits never pass through an integer or low-precision type) and
reduces the confusion counts across ranks when ``torch.distributed`` is initialised, so each rank
may feed a different shard of the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.eval.distributed import all_gather_rows, all_reduce_sum, padded_shard, rank
from rwkvclip_dist.eval.metrics import confusion_counts, summarise_counts
from rwkvclip_dist.eval.progress import progress

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def default_tokenizer() -> Tokenizer:
    from rwkvclip_dist.data.tokenizer import tokenize

    return tokenize


def fill_template(template: str, classname: str) -> str:
    """Puts the class name into ``{c}`` (our files) or ``{}`` (the common CLIP style)."""
    for slot in ("{c}", "{}"):
        if slot in template:
            return template.replace(slot, classname)
    raise ValueError(f"zero-shot template {template!r} has no '{{c}}' or '{{}}' slot for the class name")


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    desc: str = "text",
) -> torch.Tensor:
    """L2-normalised float32 text embeddings ``[len(texts), D]``, computed batch by batch."""
    tokenizer = tokenizer or default_tokenizer()
    device = torch.device(device) if device is not None else model_device(model)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in progress(starts, desc=desc, total=len(starts), disable=rank() != 0):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    if not chunks:
        raise ValueError("encode_texts got no texts")
    return torch.cat(chunks)


@torch.no_grad()
def build_zeroshot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer: Tokenizer | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights ``[D, n_classes]`` (float32, unit-norm columns).

    Each template must contain ``{c}`` or ``{}``. Under torch.distributed every rank encodes a contiguous
    slice of the classes (padded to equal length, see :func:`padded_shard`) and the slices are
    gathered, so the text tower's work is split.
    """
    if not classnames:
        raise ValueError("build_zeroshot_classifier got no class names")
    if not templates:
        raise ValueError("build_zeroshot_classifier got no templates")
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else model_device(model)
    indices, n_real = padded_shard(len(classnames))
    texts = [fill_template(t, classnames[i]) for i in indices for t in templates]
    emb = encode_texts(model, texts, tokenizer, device, batch_size, desc="zero-shot classes")
    per_class = F.normalize(emb.view(len(indices), len(templates), -1).mean(dim=1), dim=-1)[:n_real]
    model.train(was_training)
    return all_gather_rows(per_class, len(classnames)).t().contiguous()


@torch.no_grad()
def evaluate_zeroshot(
    model: nn.Module,
    classifier: torch.Tensor,
    dataloader: Iterable,
    device: torch.device | str | None = None,
) -> dict[str, float | int | None]:
    """Top-1, top-5 and mean-per-class accuracy of ``classifier`` (from build_zeroshot_classifier).

    The dataloader yields ``(images, labels)``; under torch.distributed each rank passes its own shard
    and the counts are summed, so the result is the accuracy over the union of the shards. ``top5`` is
    None with 5 classes or fewer (it would be trivially 1). ``mean_per_class`` averages
    the recall of the classes that occur in the data.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else model_device(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    counts = torch.zeros(3 + 2 * classifier.shape[1], dtype=torch.float64, device=device)
    for images, labels in progress(dataloader, desc="zero-shot images", disable=rank() != 0):
        feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
        counts += confusion_counts(feats @ classifier, labels.to(device))
    model.train(was_training)
    return summarise_counts(all_reduce_sum(counts), classifier.shape[1])


@torch.no_grad()
def zeroshot_from_features(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict:
    """The metrics of :func:`evaluate_zeroshot` from precomputed (gathered) image features."""
    classifier = classifier.to(device=features.device, dtype=torch.float32)
    logits = F.normalize(features.float(), dim=-1) @ classifier
    return summarise_counts(confusion_counts(logits, labels.to(features.device)), classifier.shape[1])
