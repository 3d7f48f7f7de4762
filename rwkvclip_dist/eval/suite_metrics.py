"""The per-task numbers of DataComp's results file, under DataComp's names.

Classification (CLIP_benchmark's definitions): ``acc1``, ``acc5`` (None with fewer than 5 classes),
``mean_per_class_recall`` (recall averaged over the classes present in the labels, sklearn's
``balanced_accuracy_score``). WILDS and fairness sets add group metrics computed from the
``npy`` metadata the tars carry, in the WILDS package's conventions: ``<metric>_avg`` over all
images, ``<metric>_<field>:<value>`` and ``count_<field>:<value>`` per group (groups numbered 0 up
to the largest value present; an empty group's metric is None, NaN in DataComp's runs),
``<metric>_wg`` the worst group among those with images.
Retrieval: ``image_retrieval_recall@k`` (text -> image), ``text_retrieval_recall@k`` (image ->
text), as fractions, and their mean at k=1, ``mean_recall@1``.
"""

from __future__ import annotations

import torch

# Per WILDS/fairness task: the names of the npy metadata columns (DataComp's evaluators), the
# column the groups come from, the metric (name, top-k) and how the worst group is reported.
WILDS_LAYOUT = {
    "wilds/iwildcam": {"fields": ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y")},
    "wilds/camelyon17": {"fields": ("hospital", "slide", "y"), "group_by": "slide", "metric": ("acc", 1)},
    "wilds/fmow": {"fields": ("region", "year", "y"), "group_by": "year", "metric": ("acc", 1),
                   "worst_name": "acc_worst_year", "also_by": "region"},
    "fairness/dollar_street": {"fields": ("income_ds", "income_meta", "region"), "group_by": "income_ds",
                               "metric": ("acc_top5", 5)},
    "fairness/geode": {"fields": ("region", "country"), "group_by": "region", "metric": ("acc", 1)},
}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    n_classes = logits.shape[1]
    top = logits.topk(min(5, n_classes), dim=1).indices
    hit = top == labels[:, None]
    pred = top[:, 0]
    present = labels.unique()
    recalls = [float((pred[labels == c] == c).double().mean()) for c in present.tolist()]
    return {"acc1": float(hit[:, 0].double().mean()),
            "acc5": float(hit.any(1).double().mean()) if n_classes >= 5 else None,
            "mean_per_class_recall": sum(recalls) / len(recalls),
            "n": int(labels.numel())}


def _grouped(correct: torch.Tensor, groups: torch.Tensor, name: str, field: str) -> tuple[dict, float]:
    """Per-group mean of ``correct`` and the worst over non-empty groups."""
    out, worst = {}, None
    for g in range(int(groups.max()) + 1):
        members = groups == g
        count = int(members.sum())
        value = float(correct[members].double().mean()) if count else None  # DataComp's runs: NaN
        out[f"{name}_{field}:{g}"], out[f"count_{field}:{g}"] = value, float(count)
        if count:
            worst = value if worst is None else min(worst, value)
    return out, worst


def wilds_metrics(task_key: str, logits: torch.Tensor, labels: torch.Tensor, metadata: torch.Tensor) -> dict:
    """The group metrics of a WILDS or fairness task; ``metadata`` [N, len(fields)]."""
    layout = WILDS_LAYOUT[task_key]
    fields = layout["fields"]
    if metadata.shape[1] != len(fields):
        raise ValueError(f"{task_key}: the tars' npy metadata has {metadata.shape[1]} columns, "
                         f"expected {len(fields)} ({', '.join(fields)})")
    pred = logits.argmax(1)
    if "group_by" not in layout:  # iWildCam: macro scores over the classes present in the labels
        from sklearn.metrics import f1_score, recall_score

        present = labels.unique().numpy()
        return {"acc_avg": float((pred == labels).double().mean()),
                "recall-macro_all": float(recall_score(labels.numpy(), pred.numpy(), labels=present,
                                                       average="macro", zero_division=0)),
                "F1-macro_all": float(f1_score(labels.numpy(), pred.numpy(), labels=present,
                                               average="macro", zero_division=0))}
    name, k = layout["metric"]
    correct = (logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(1)
    field = layout["group_by"]
    out, worst = _grouped(correct, metadata[:, fields.index(field)], name, field)
    out[f"{name}_avg"] = float(correct.double().mean())
    out[layout.get("worst_name", f"{name}_wg")] = worst
    if "also_by" in layout:
        other = layout["also_by"]
        more, worst_other = _grouped(correct, metadata[:, fields.index(other)], name, other)
        out.update(more)
        out[f"{name}_worst_{other}"] = worst_other
    return out


def retrieval_metrics(recall: dict) -> dict:
    """DataComp's names for :func:`rwkvclip_dist.eval.retrieval.retrieval_recall`'s percentages."""
    out = {}
    for key, value in recall.items():
        if key.startswith("t2i_R@"):
            out[f"image_retrieval_recall@{key[6:]}"] = value / 100.0
        elif key.startswith("i2t_R@"):
            out[f"text_retrieval_recall@{key[6:]}"] = value / 100.0
    out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    out["n"], out["n_texts"] = recall["n_images"], recall["n_texts"]
    return out
