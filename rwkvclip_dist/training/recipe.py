"""Training recipes: YAML files loaded into typed dataclasses.

A recipe names everything a run needs (model, data, loss, optimizer, schedule, parallelism,
checkpointing, evaluation, logging). Each section's dataclass lives with the component it configures
(``data.config.DataConfig``, ``loss.LossSection``, ``training.optim.OptimizerSection``...) and checks
its own values when the recipe loads, so a mistake stops the run before any process group or engine
starts. ``base: other.yaml`` inherits from another recipe (path relative to the file that says it;
mappings merge key by key, anything else is replaced). Command-line overrides are dotted keys,
``optimizer.lr=3e-4``, parsed to the field's type. Unknown keys and bad values are errors that name
the key and the file (or "command line") it came from. Paths in a recipe (data streams, evaluation
data and class files, the checkpoint directory) are relative to the folder of the file that sets
them, as ``base:`` is; paths given on the command line are relative to the current directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rwkvclip_dist.checkpoint.section import CheckpointSection
from rwkvclip_dist.cli import read_text_file
from rwkvclip_dist.data.config import DataConfig
from rwkvclip_dist.loss import LossSection
from rwkvclip_dist.parallel.engine import ParallelSection
from rwkvclip_dist.training.ema import EmaSection
from rwkvclip_dist.training.evals import EvalSection, ZeroShotEvalSection
from rwkvclip_dist.training.lock import LockSection
from rwkvclip_dist.training.metrics import LoggingSection
from rwkvclip_dist.training.optim import OptimizerSection
from rwkvclip_dist.strict_yaml import load_strict
from rwkvclip_dist.training.schedule import ScheduleSection
from rwkvclip_dist.training.spike import SpikeSection
from rwkvclip_dist.typed_config import (ConfigError, FieldError, FileOrigin, build_dataclass, parse_override,
                                        path_field, to_plain)

__all__ = [
    "ConfigError", "Recipe", "ModelSection", "TrainSection", "LossSection", "OptimizerSection",
    "ScheduleSection", "ParallelSection", "CheckpointSection", "ZeroShotEvalSection", "EvalSection",
    "LoggingSection", "load_recipe", "save_recipe",
]


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class ModelSection:
    name: str = "tiny"
    """Registry name passed to ``rwkvclip_dist.create_model``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides for ``create_model``, e.g. ``{"image.drop_path_rate": 0.1}``."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant)."""
    init_from: str = path_field("", exists="any")
    """Start from these weights (``training/init_from.py``): a pretrained .safetensors, the authors'
    .pt, or a run (or checkpoint) directory's newest complete checkpoint. Not applied on resume."""
    lock: LockSection = field(default_factory=LockSection)
    """Frozen towers: ``{image: {locked: true, unlocked_blocks: 0, norms_trainable: false}, text: ...}``
    (``training/lock.py``)."""
    compile: bool = False
    """``torch.compile`` the towers' blocks (``parallel/compile.py``)."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend: inductor (fused kernels), aot_eager (traced, no code generation)."""
    init_ignore: list[str] = field(default_factory=list)
    """Regular expressions of keys that init_from may leave fresh (missing, other shape) or drop
    (unexpected); any other mismatch refuses the run."""

    def __post_init__(self) -> None:
        import re

        from rwkvclip_dist.model.registry import get_model_config, list_models

        if self.compile_backend not in COMPILE_BACKENDS:
            raise FieldError("compile_backend", f"must be one of {', '.join(COMPILE_BACKENDS)}, got "
                             f"{self.compile_backend!r}")
        for pattern in self.init_ignore:
            try:
                re.compile(pattern)
            except re.error as err:
                raise FieldError("init_ignore", f"{pattern!r} is not a regular expression: {err}") from None

        if self.name not in list_models():
            raise FieldError("name", f"unknown model {self.name!r}; registered: {', '.join(list_models())}")
        try:
            get_model_config(self.name, **self.overrides)
        except ValueError as err:  # the config loader's message names the bad override
            raise FieldError("overrides", str(err)) from None


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps of the whole run (resumed runs count the steps already done)."""
    accumulation_steps: int = 1
    """Micro-batches (of ``data.batch_size`` per rank) per optimizer step; the contrastive loss still
    sees all of them at once."""
    seed: int = 0
    """Seeds model init, data order and augmentation; every rank derives its own stream from it."""
    max_nonfinite_steps: int = 5
    """Stop the run after this many non-finite losses in a row (each one skips its step)."""
    spike: SpikeSection = field(default_factory=SpikeSection)
    """``{enabled: true, factor: 3, window: 20, patience: 1, max_rewinds: 3}``: rewind to the checkpoint
    before a loss spike and skip the data that led to it (``training/spike.py``)."""
    ema: EmaSection = field(default_factory=EmaSection)
    """``{enabled: true, decay: 0.9999, every_steps: 1, warmup: true}``: an EMA of the weights on the
    optimizer's partitions (``training/ema.py``)."""

    def __post_init__(self) -> None:
        for name in ("steps", "accumulation_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str = ""
    """The recipe file this was loaded from (informational, set by the loader)."""

    def __post_init__(self) -> None:
        from rwkvclip_dist.model.registry import get_model_config
        from rwkvclip_dist.parallel.tensor_parallel import tensor_parallel_problems

        if not self.data.streams:
            raise FieldError("data.streams", "is empty: a run needs at least one MDS stream ({remote: DIR or URL})")
        if self.data.batch_size % self.train.accumulation_steps:
            raise FieldError("train.accumulation_steps", f"{self.train.accumulation_steps} must divide "
                             f"data.batch_size={self.data.batch_size} (micro-batches of equal size)")
        problems = tensor_parallel_problems(get_model_config(self.model.name, **self.model.overrides),
                                            self.parallel.tensor_parallel)
        if problems:
            raise FieldError("parallel.tensor_parallel", f"model {self.model.name!r}: " + "; ".join(problems))
        if self.train.ema.enabled and self.parallel.zero_stage == 0:
            raise FieldError("train.ema", "needs parallel.zero_stage >= 1 (the EMA lives on the optimizer's "
                             "partitions of the fp32 master weights)")
        if self.eval.use_ema and not self.train.ema.enabled:
            raise FieldError("eval.use_ema", "needs train.ema.enabled: true (there is no EMA to evaluate)")
        if self.eval.use_ema and self.parallel.zero_stage not in (1, 2):
            raise FieldError("eval.use_ema", f"needs parallel.zero_stage 1 or 2, got {self.parallel.zero_stage} "
                             "(the EMA is swapped into ZeRO-1/2's master partitions for the evaluation)")
        if self.schedule.kind == "wsd" and self.schedule.cooldown_from > self.train.steps:
            raise FieldError("schedule.cooldown_from", f"{self.schedule.cooldown_from} is past train.steps="
                             f"{self.train.steps}: the run must end after its cool-down starts")
        if self.loss.kind != "siglip" and get_model_config(self.model.name, **self.model.overrides).init_logit_bias is not None:
            raise FieldError("model.overrides", "init_logit_bias (a learned SigLIP bias) needs loss.kind: siglip")
        if self.parallel.offload_optimizer != "none" and self.optimizer.impl not in ("auto", "torch"):
            raise FieldError("optimizer.impl", f"{self.optimizer.impl!r} cannot run under parallel.offload_optimizer="
                             f"{self.parallel.offload_optimizer} (DeepSpeed's CPU Adam makes the update); use auto")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = read_text_file(path, "recipe", ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    data = load_strict(text, f"recipe {path}")  # a key given twice, yes/no, 010...: errors, not guesses
    if data is None:
        raise ConfigError(f"recipe {path}: the file is empty (no keys{', only comments' if text.strip() else ''}); "
                          f"write {{}} for a recipe given wholly on the command line")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(into: dict, new: dict, origin: dict, source: str, prefix: str = "") -> None:
    """Deep-merge ``new`` into ``into``, recording which file each leaf key came from."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, origin, source, dotted + ".")
        else:
            into[key] = value
            origin[dotted] = source


def _load_tree(path: Path, origin: dict, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"recipe {path}: 'base:' inheritance forms a cycle: {' -> '.join(map(str, chain + (path,)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    tree: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"recipe {path}: 'base' must be a file name, got {base!r}")
        tree = _load_tree(path.parent / base, origin, chain + (path,))
    _merge(tree, data, origin, FileOrigin(f"recipe {path}", path.parent))
    return tree


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree[a][b]...`` for ``a.b...``; a numeric part indexes a list (``eval.zeroshot.0.every_steps``)."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"command line: {key}: {'.'.join(parts[:i])} has no item {part}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"command line: {key}: {'.'.join(parts[:i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"command line: {key}: {'.'.join(parts[:-1])} has no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True) -> Recipe:
    """Load ``path`` (following ``base:``), apply ``key.sub=value`` overrides, check every type and
    value. Paths are made absolute; ``check_paths=False`` skips checking that data and class files
    exist (for tools that only read a recipe's sizes)."""
    origin: dict[str, str] = {}
    tree = _load_tree(Path(path), origin)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = parse_override(Recipe, key.strip(), raw)
        _set_dotted(tree, key.strip(), value)
        origin[key.strip()] = "command line"
    tree.setdefault("source", str(Path(path)))
    return build_dataclass(Recipe, tree, origin, f"recipe {Path(path).resolve()}", check_paths=check_paths)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe (every field, defaults included) as YAML."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_plain(recipe), sort_keys=False))
    tmp.replace(path)

