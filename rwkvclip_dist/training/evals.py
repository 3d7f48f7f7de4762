"""In-loop evaluations declared in the recipe (``eval.zeroshot``), each with its own frequency.

They take the evaluation suite's own path (``rwkvclip_dist.eval``: the same data reader, sharded
features in which every held-out image counts once, the same classifier), so the figure a run logs
equals what ``tools/evaluate.py`` reports for the same weights and data. This module only opens each
data set once and names the results ``<name>_top1`` and so on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from rwkvclip_dist.training.suite_evals import SuiteEvalSection
from rwkvclip_dist.typed_config import ConfigError, FieldError, path_field


def _names_a_file(classes: str) -> bool:
    from rwkvclip_dist.eval.classnames import is_shipped_template_set

    return not is_shipped_template_set(classes)


@dataclass
class ZeroShotEvalSection:
    name: str = "zeroshot"
    """Metric prefix: figures appear as <name>_top1, <name>_top5, <name>_mean_per_class."""
    data: str = path_field("", exists="dir")
    """Held-out labelled images: a labelled MDS directory (``jpg`` and ``label`` columns) or an image
    folder with one sub-folder per class (WordNet-id folders get the ImageNet-1k class names)."""
    classes: str = path_field("", exists="file", is_path=_names_a_file)
    """Template set: a shipped name (``imagenet``, ...) or a JSON file with ``templates`` and, unless
    ``classnames`` or the folder names give them, ``classnames``."""
    classnames: str = path_field("", exists="file")
    """Optional text file with one class name per line, in label order."""
    every_steps: int = 0
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    batch_size: int = 256
    """Images per forward pass on each rank."""
    num_workers: int = 2
    """DataLoader worker processes decoding the held-out images."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise FieldError("name", "must not be empty (it prefixes the metrics: <name>_top1, ...)")
        for name in ("data", "classes"):
            if not getattr(self, name):
                raise FieldError(name, f"must be set (evaluation {self.name!r})")
        for name, low in (("every_steps", 0), ("batch_size", 1), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise FieldError(name, f"must be >= {low}, got {getattr(self, name)}")


@dataclass
class EvalSection:
    zeroshot: list[ZeroShotEvalSection] = field(default_factory=list)
    suite: list[SuiteEvalSection] = field(default_factory=list)
    """Any subset of the DataComp or paper suite's tasks (training/suite_evals.py)."""
    at_end: bool = True
    """Run every evaluation once more after the last step."""
    use_ema: bool = False
    """Score the EMA weights (``train.ema``) instead of the trained ones (``training/ema.py``)."""

    def __post_init__(self) -> None:
        names = [section.name for section in self.zeroshot]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise FieldError("zeroshot", f"evaluation names must differ (they prefix the metrics), {twice} repeat")


class ZeroShotTask:
    """One ``eval.zeroshot`` entry: its data set opened once, scored from the current weights."""

    # The imports inside the methods are deliberate: loading a recipe imports this module for its
    # sections, and must not pull in the tokenizer (open_clip) and the evaluation suite.

    def __init__(self, section: ZeroShotEvalSection, image_size: int, context_length: int,
                 device: torch.device) -> None:
        from rwkvclip_dist.data.tokenizer import tokenize
        from rwkvclip_dist.data.transforms import eval_transform
        from rwkvclip_dist.eval import class_names, load_class_prompts, open_labelled_images

        self.section, self.device = section, device
        self.tokenizer = partial(tokenize, context_length=context_length)
        where = f"eval.zeroshot {section.name!r}"
        try:
            self.dataset, folder_names = open_labelled_images(section.data, eval_transform(image_size))
            prompts = load_class_prompts(section.classes)
            self.classnames = class_names(prompts, folder_names, section.classnames or None, section.data,
                                          None if folder_names is not None else self.dataset.labels())
        except (OSError, ValueError) as err:
            # Not type(err)(...): UnicodeDecodeError's or FieldError's constructors take other arguments.
            raise ConfigError(f"{where}: {err}") from err
        self.templates = list(prompts["templates"])

    def due(self, step: int) -> bool:
        every = self.section.every_steps
        return every > 0 and step % every == 0

    def run(self, model: nn.Module) -> dict[str, float]:
        from rwkvclip_dist.eval import LoaderConfig, image_features, zeroshot_scores

        section = self.section
        features, labels = image_features(model, self.dataset, LoaderConfig(section.batch_size, section.num_workers),
                                          self.device, desc=f"eval {section.name}")
        results = zeroshot_scores(model, features, labels, self.classnames, self.templates, self.tokenizer, self.device)
        return {f"{section.name}_{key}": value for key, value in results.items() if value is not None}


def open_evaluations(sections: list[ZeroShotEvalSection], model_name: str, model_overrides: dict,
                     device: torch.device) -> list[ZeroShotTask]:
    """Every ``eval.zeroshot`` entry with its data and class names opened, for the recipe's model
    (its resolution and context length); needs no process group, so it can run before one starts."""
    from rwkvclip_dist.model.registry import get_model_config

    config = get_model_config(model_name, **model_overrides)
    return [ZeroShotTask(s, config.image.image_size, config.text.context_length, device) for s in sections]
