"""Image-text retrieval recall (R@1/5/10 in both directions) from precomputed embeddings.

Each image may own several captions (COCO has about 5); a query image counts as retrieved at k
when any of its captions ranks in the top k, a query caption when its one image does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k for image->text (``i2t_R@k``) and text->image (``t2i_R@k``), in percent.

    ``image_features`` [Ni, D] and ``text_features`` [Nt, D] should be L2-normalised (the similarity
    is their dot product, in float32); ``text_to_image`` [Nt] holds the image index of each caption.
    Work is chunked over queries so that a 25k x 5k similarity matrix is never held at once.
    """
    img = image_features.float()
    txt = text_features.float()
    owner = text_to_image.to(img.device).long()
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image has shape {tuple(owner.shape)}, expected ({n_txt},)")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"text_to_image holds an image index outside [0, {n_img})")
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs images and captions, got {n_img} images and {n_txt} captions")
    if (torch.bincount(owner, minlength=n_img) == 0).any():
        raise ValueError("some images have no caption; image->text recall is undefined for them")
    # Ties count in the query's favour (only strictly higher scores push a match down).
    # Rank of the best-ranked matching text for each image; rank of the image for each text.
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=img.device)
    for start in range(0, n_img, chunk_size):
        sims = img[start : start + chunk_size] @ txt.t()  # [b, Nt]
        rows = torch.arange(start, start + sims.shape[0], device=img.device)
        is_match = owner[None, :] == rows[:, None]
        best_match = sims.masked_fill(~is_match, float("-inf")).max(dim=1).values
        i2t_rank[start : start + sims.shape[0]] = (sims > best_match[:, None]).sum(dim=1)
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=img.device)
    for start in range(0, n_txt, chunk_size):
        sims = txt[start : start + chunk_size] @ img.t()  # [b, Ni]
        own = sims.gather(1, owner[start : start + sims.shape[0], None])
        t2i_rank[start : start + sims.shape[0]] = (sims > own).sum(dim=1)
    result: dict[str, float] = {}
    for k in ks:
        result[f"i2t_R@{k}"] = 100.0 * float((i2t_rank < k).double().mean())
    for k in ks:
        result[f"t2i_R@{k}"] = 100.0 * float((t2i_rank < k).double().mean())
    result["n_images"] = n_img
    result["n_texts"] = n_txt
    return result
