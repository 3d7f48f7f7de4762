"""In-loop evaluation on any subset of a suite's tasks (``eval.suite`` in the recipe).

The same scorer as ``tools/evaluate.py --suite`` (``rwkvclip_dist.eval.suite_runner``), so the logged
figures equal the tool's for the same weights. Unlike the tool, a task whose data is missing stops
the run before training starts: an in-loop curve with a task silently absent would mislead.
Metrics are logged as ``<name>/<task key>`` (the task's main metric) and ``<name>/average``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from rwkvclip_dist.typed_config import FieldError, path_field


@dataclass
class SuiteEvalSection:
    name: str = "suite"
    """Metric prefix: figures appear as <name>/<task key> and <name>/average."""
    suite: str = "datacomp"
    """'datacomp' or 'paper' (rwkvclip_dist/eval/suite.py)."""
    data_dir: str = path_field("", exists="dir")
    """The directory of the wds_<task> folders, as for ``tools/evaluate.py --data-dir``."""
    tasks: list[str] = field(default_factory=list)
    """Task keys or names to run; empty runs the whole suite."""
    every_steps: int = 0
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    batch_size: int = 256
    """Images per forward pass on each rank."""
    num_workers: int = 2
    """DataLoader worker processes decoding the images."""

    def __post_init__(self) -> None:
        from rwkvclip_dist.eval.suite import SUITES

        if self.suite not in SUITES:
            raise FieldError("suite", f"must be one of {sorted(SUITES)}, got {self.suite!r}")
        if not self.data_dir:
            raise FieldError("data_dir", f"must be set (evaluation {self.name!r})")
        for name, low in (("every_steps", 0), ("batch_size", 1), ("num_workers", 0)):
            if getattr(self, name) < low:
                raise FieldError(name, f"must be >= {low}, got {getattr(self, name)}")


class SuiteEvalTask:
    """One ``eval.suite`` entry, its tasks planned (and their data found) once."""

    def __init__(self, section: SuiteEvalSection, image_size: int, context_length: int, device: torch.device) -> None:
        from rwkvclip_dist.data.tokenizer import tokenize
        from rwkvclip_dist.data.transforms import eval_transform
        from rwkvclip_dist.eval.suite import get_suite
        from rwkvclip_dist.eval.suite_runner import missing_report, plan

        self.section, self.device = section, device
        where = f"eval.suite {section.name!r}"
        try:
            self.planned = plan(get_suite(section.suite).select(section.tasks or None), section.data_dir)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        missing = missing_report(self.planned)
        if missing:
            raise FileNotFoundError(f"{where}: {missing}")
        self.transform = eval_transform(image_size)
        self.tokenizer = partial(tokenize, context_length=context_length)

    def due(self, step: int) -> bool:
        every = self.section.every_steps
        return every > 0 and step % every == 0

    def run(self, model: nn.Module) -> dict[str, float]:
        from rwkvclip_dist.eval.features import LoaderConfig
        from rwkvclip_dist.eval.suite_runner import SuiteScorer, run_tasks

        section = self.section
        scorer = SuiteScorer(model, self.transform, self.tokenizer, self.device,
                             LoaderConfig(section.batch_size, section.num_workers))
        rows = run_tasks(scorer, self.planned)
        scores = {f"{section.name}/{r['key']}": float(r["metrics"]["main_metric"]) for r in rows}
        scores[f"{section.name}/average"] = sum(scores.values()) / len(scores)
        return scores


def open_suite_evaluations(sections: list[SuiteEvalSection], model_name: str, model_overrides: dict,
                           device: torch.device) -> list[SuiteEvalTask]:
    from rwkvclip_dist.model.registry import get_model_config

    config = get_model_config(model_name, **model_overrides)
    return [SuiteEvalTask(s, config.image.image_size, config.text.context_length, device) for s in sections]
