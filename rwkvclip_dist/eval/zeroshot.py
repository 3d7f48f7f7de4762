"""Zero-shot classification: a text classifier built from class names and prompt templates.

``build_zeroshot_classifier`` returns a ``[D, n_classes]`` matrix whose columns are the renormalised
mean of the L2-normalised text embeddings of one class's prompts. ``zeroshot_from_features`` scores
image features against it in float32 (logits never pass through an integer or low-precision type).
The features come from :func:`rwkvclip_dist.eval.features.image_features`, which shards the images
over ranks without padding duplicates into the result, so every image counts exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.eval.distributed import all_gather_rows, padded_shard, rank
from rwkvclip_dist.eval.metrics import confusion_counts, summarise_counts
from rwkvclip_dist.eval.progress import progress

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32


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
def zeroshot_from_features(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict:
    """Top-1, top-5 and mean-per-class accuracy of ``classifier`` on image features (gathered from
    every rank by :func:`rwkvclip_dist.eval.features.image_features`, so each image counts once).

    ``top5`` is None with 5 classes or fewer (it would be trivially 1); ``mean_per_class`` averages
    the recall of the classes that occur in the data."""
    classifier = classifier.to(device=features.device, dtype=torch.float32)
    logits = F.normalize(features.float(), dim=-1) @ classifier
    return summarise_counts(confusion_counts(logits, labels.to(features.device)), classifier.shape[1])


def zeroshot_scores(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                    templates: Sequence[str], tokenizer: Tokenizer | None = None,
                    device: torch.device | str | None = None, text_batch_size: int = 256) -> dict:
    """Zero-shot metrics of ``model`` on precomputed image features: the one path that both
    ``tools/evaluate.py`` and the in-loop evaluation of a training run take."""
    classifier = build_zeroshot_classifier(model, classnames, templates, tokenizer, device, text_batch_size)
    return zeroshot_from_features(features, labels, classifier)
