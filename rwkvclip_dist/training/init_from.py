"""``model.init_from``: start a run from trained weights instead of a fresh initialisation.

The source is anything the tools already read: our pretrained ``.safetensors`` (with its JSON), the
authors' released ``.pt`` (through the converter's key mapping, ``convert/authors.py``), or a training
run (its run directory or its checkpoint directory: the newest complete checkpoint, any ZeRO stage or
tensor-parallel size, consolidated by ``convert/zero.py``). The weights go into the plain model before
tensor parallelism slices it and before the DeepSpeed engine is built, so every ZeRO stage and
partition sees them as its initial weights, and the source's TP size need not be the run's. Every
rank reads the whole source itself: this runs before any process group exists.

Nothing is loaded by halves: every key of the model must come from the source and every key of the
source must have a place in the model, except those the recipe names in ``model.init_ignore``
(regular expressions, ``re.search``): an ignored missing key keeps its fresh initialisation, an
ignored unexpected key is dropped. The one reshaping done is the one a new resolution needs: the
image tower's position embedding is interpolated to the new patch grid (bicubic, as open_clip's
``resize_pos_embed``), which is what ``position_embedding`` does at run time for other input sizes.
A resumed run never re-applies ``init_from``: its checkpoint already holds the trained weights.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rwkvclip_dist.pretrained_format import StateDictMismatch, load_state_dict_file

log = logging.getLogger(__name__)

# Keys tied to the image tower's patch grid: resized by interpolation when the grid changes.
GRID_KEYS = ("visual.pos_embed",)


@dataclass
class InitReport:
    """What :func:`load_initial_weights` did, key by key."""

    source: str
    kind: str
    """'pretrained', 'authors' or 'run checkpoint <dir>/<tag>'."""
    matched: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    """Grid-tied keys interpolated to the model's grid ('key: (from) -> (to)')."""
    missing: list[str] = field(default_factory=list)
    """Model keys the source lacks, left at their fresh initialisation (allowed by init_ignore)."""
    unexpected: list[str] = field(default_factory=list)
    """Source keys the model has no place for, dropped (allowed by init_ignore)."""
    mismatched: list[str] = field(default_factory=list)
    """Keys of other shapes, left at their fresh initialisation (allowed by init_ignore)."""

    def table(self) -> str:
        rows = [("matched", self.matched), ("reshaped", self.reshaped), ("missing (kept fresh)", self.missing),
                ("unexpected (dropped)", self.unexpected), ("other shape (kept fresh)", self.mismatched)]
        lines = [f"model.init_from {self.source} ({self.kind}):", f"  {'keys':<26}{'count':>6}  names"]
        for title, keys in rows:
            names = ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")
            lines.append(f"  {title:<26}{len(keys):>6}  {names if title != 'matched' else ''}".rstrip())
        return "\n".join(lines)


def _newest_checkpoint(directory: Path) -> tuple[Path, str] | None:
    """``(checkpoint dir, tag)`` of the newest complete checkpoint of a run or checkpoint directory."""
    from rwkvclip_dist.checkpoint.manager import CheckpointManager

    for candidate in (directory / "checkpoints", directory):
        if (candidate / "latest").is_file():
            tags = CheckpointManager(candidate).complete_tags()
            if tags:
                return candidate, tags[-1]
    return None


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict (our naming, fp32) of an init source, and what kind of source it was."""
    from rwkvclip_dist.convert import authors

    path = Path(path)
    if path.is_dir():
        found = _newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"model.init_from: {path} holds no complete checkpoint (neither "
                                    f"{path}/checkpoints/latest nor {path}/latest)")
        return _read_run_checkpoint(*found), f"run checkpoint {found[0] / found[1]}"
    state = load_state_dict_file(path)
    if any(k.startswith(("image_model.", "text_model.")) for k in state):
        return authors.from_authors(state, *authors.infer_depths(state)), "authors' release"
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, "pretrained file"


def _read_run_checkpoint(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from rwkvclip_dist.convert.zero import load_zero_checkpoint, trained_model
    from rwkvclip_dist.model.clip import RWKVCLIP
    from rwkvclip_dist.model.registry import get_model_config
    from rwkvclip_dist.parallel.tensor_parallel import split_dims

    trained = trained_model(checkpoint_dir, tag)
    dims = None
    if trained is not None:
        with torch.device("meta"):
            dims = split_dims(RWKVCLIP(get_model_config(trained[0], **trained[1]), initialize=False))
    return load_zero_checkpoint(checkpoint_dir, tag, dims)


def resize_grid_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A ``[1, g*g, C]`` position embedding bicubically resized to ``[1, grid*grid, C]``."""
    old = math.isqrt(table.shape[1])
    if old * old != table.shape[1]:
        raise StateDictMismatch(f"position embedding of {table.shape[1]} positions is not a square grid")
    image = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)


@dataclass
class InitialWeights:
    """A checked init source: the tensors to copy into a fresh model, and the report."""

    load: dict[str, torch.Tensor]
    report: InitReport

    def apply(self, model: nn.Module) -> None:
        target = model.state_dict()
        with torch.no_grad():
            for key, value in self.load.items():
                target[key].copy_(value.reshape(target[key].shape).to(target[key].dtype))
        self.load = {}  # the source's copy of the weights is not kept for the whole run


def plan_initial_weights(source: str | Path, expected: dict[str, torch.Size], model_name: str,
                         ignore: list[str] | tuple[str, ...] = ()) -> InitialWeights:
    """Read ``source`` and match it against a model with parameter shapes ``expected`` (see the
    module docstring); raises ``StateDictMismatch`` listing every key problem the recipe did not allow."""
    state, kind = read_source(source)
    report = InitReport(str(source), kind)
    patterns = [re.compile(p) for p in ignore]
    allowed = lambda key: any(p.search(key) for p in patterns)  # noqa: E731
    refused: list[str] = []
    load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in expected:
            if allowed(key):
                report.unexpected.append(key)
            else:
                refused.append(f"unexpected {key}")
            continue
        want = torch.Size(expected[key])
        # logit_scale is 0-dim in the model and shape [1] in a DeepSpeed checkpoint.
        if value.shape == want or (value.numel() == want.numel() == 1):
            load[key] = value
            report.matched.append(key)
        elif key in GRID_KEYS and value.dim() == 3 and value.shape[2] == want[2]:
            load[key] = resize_grid_embedding(value, math.isqrt(want[1]))
            report.reshaped.append(f"{key}: {tuple(value.shape)} -> {tuple(want)}")
        elif allowed(key):
            report.mismatched.append(key)
        else:
            refused.append(f"other shape {key}: source {tuple(value.shape)} vs model {tuple(want)}")
    for key in sorted(set(expected) - set(state)):
        if allowed(key):
            report.missing.append(key)
        else:
            refused.append(f"missing {key}")
    if refused:
        shown = "; ".join(refused[:12]) + (f"; ... ({len(refused) - 12} more)" if len(refused) > 12 else "")
        raise StateDictMismatch(f"model.init_from {source} ({kind}) does not fit model {model_name!r}: {len(refused)} "
                                f"key(s) not allowed by model.init_ignore: {shown}; nothing was loaded")
    return InitialWeights(load, report)


def load_initial_weights(model: nn.Module, source: str | Path, ignore: list[str] | tuple[str, ...] = ()) -> InitReport:
    """Check ``source`` against ``model`` and load it (all or nothing); returns the report."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    weights = plan_initial_weights(source, expected, name, ignore)
    weights.apply(model)
    return weights.report


def resumes(resume: bool, checkpoint_dir: Path) -> bool:
    """Whether the run will resume from its own checkpoint (which wins over init_from)."""
    from rwkvclip_dist.checkpoint.manager import CheckpointManager

    return resume and CheckpointManager(checkpoint_dir).latest_tag() is not None


def prepare_init_from(section, resume: bool, checkpoint_dir: Path) -> InitialWeights | None:
    """The trainer's hook, before any process group starts (a refused source changes no file):
    ``section`` is the recipe's ``model:`` section. Logs the table, or why nothing is loaded."""
    from rwkvclip_dist.convert.pipeline import expected_shapes
    from rwkvclip_dist.model.registry import get_model_config

    if not section.init_from:
        return None
    if resumes(resume, checkpoint_dir):
        log.info("model.init_from %s not applied: the run resumes from its checkpoint in %s (resume wins)",
                    section.init_from, checkpoint_dir)
        return None
    config = get_model_config(section.name, **section.overrides)
    weights = plan_initial_weights(section.init_from, expected_shapes(config), config.name, section.init_ignore)
    log.info("%s", weights.report.table())
    return weights
