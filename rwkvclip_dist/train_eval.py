"""In-loop evaluations declared in the recipe (``eval.zeroshot``), each with its own frequency.

The metric code lives in ``rwkvclip_dist.eval.zeroshot``; this module only builds the held-out loaders
once, rebuilds the text classifier from the current weights at each evaluation, and names the results
``<name>_top1`` and so on.
"""
from __future__ import annotations


import torch
from torch import nn

from rwkvclip_dist.recipe import ZeroShotEvalSection


def _read_classes(path: str, name: str) -> tuple[list[str], list[str]]:
    """Class names and templates from the evaluation suite's template-set loader (a shipped name or a
    JSON file); its fill_template accepts both the '{c}' and the '{}' slot."""
    from rwkvclip_dist.eval.datasets import load_class_prompts

    try:
        data = load_class_prompts(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"eval.zeroshot '{name}': {err}") from None
    if "classnames" not in data:
        raise ValueError(f"eval.zeroshot '{name}': {path} lacks 'classnames'")
    return list(data["classnames"]), list(data["templates"])


class ZeroShotTask:
    def __init__(self, section: ZeroShotEvalSection, image_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if not section.data or not section.classes:
            raise ValueError(f"eval.zeroshot '{section.name}': both 'data' and 'classes' must be set")
        from rwkvclip_dist.data.loader import build_eval_dataloader

        self.section = section
        self.classnames, self.templates = _read_classes(section.classes, section.name)
        self.loader, _ = build_eval_dataloader(section.data, image_size, section.batch_size, with_label=True)
        self.dtype = dtype
        self.device = device

    def due(self, step: int) -> bool:
        every = self.section.every_steps
        return every > 0 and step % every == 0

    def _images_and_labels(self):
        for images, _tokens, _text_id, labels in self.loader:
            yield images.to(self.device, self.dtype), labels

    def run(self, model: nn.Module) -> dict[str, float]:
        from rwkvclip_dist.eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot

        classifier = build_zeroshot_classifier(model, self.classnames, self.templates, device=self.device)
        results = evaluate_zeroshot(model, classifier, self._images_and_labels(), self.device)
        prefix = self.section.name
        return {f"{prefix}_{key}": value for key, value in results.items() if value is not None}
