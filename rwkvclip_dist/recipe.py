"""Training recipes: YAML files loaded into typed dataclasses.

A recipe names everything a run needs (model, data, loss, optimizer, schedule, parallelism,
checkpointing, evaluation, logging). ``base: other.yaml`` inherits from another recipe (path relative
to the file that says it; mappings merge key by key, anything else is replaced). Command-line
overrides are dotted keys, ``optimizer.lr=3e-4``, parsed to the field's type. Unknown keys and
values of the wrong type are errors that name the key and the file (or "command line") it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rwkvclip_dist.data.config import DataConfig
from rwkvclip_dist.typed_config import ConfigError, build_dataclass, parse_override, to_plain

__all__ = [
    "ConfigError", "Recipe", "ModelSection", "TrainSection", "LossSection", "OptimizerSection",
    "ScheduleSection", "ParallelSection", "CheckpointSection", "ZeroShotEvalSection", "EvalSection",
    "LoggingSection", "load_recipe", "save_recipe",
]


@dataclass
class ModelSection:
    name: str = "tiny"
    """Registry name passed to ``rwkvclip_dist.create_model``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides for ``create_model``, e.g. ``{"image.drop_path_rate": 0.1}``."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant)."""


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


@dataclass
class LossSection:
    kind: Literal["clip", "siglip"] = "clip"
    """'clip': symmetric InfoNCE over the global batch; 'siglip': pairwise sigmoid loss."""
    local_loss: bool = True
    """Each rank computes logits for its own rows only against all columns (memory O(B x global B))."""
    gather_with_grad: bool = True
    """All-gather features with gradient; required for the exact global-batch gradient."""
    siglip_bias: float = -10.0
    """Logit bias of the SigLIP loss (a fixed constant here; SigLIP learns it)."""


@dataclass
class OptimizerSection:
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    decay_everything: bool = False
    """Paper option: weight decay on every parameter. Default: none on norms, biases, token-mix
    vectors, decays, bonus, embeddings and logit_scale."""


@dataclass
class ScheduleSection:
    kind: Literal["cosine", "onecycle", "constant"] = "cosine"
    """'cosine': linear warm-up then cosine to min_lr_ratio; 'onecycle': the paper's alternative."""
    warmup_fraction: float = 0.1
    """Fraction of train.steps spent warming up (cosine) or rising (onecycle)."""
    min_lr_ratio: float = 0.0
    """Final lr / peak lr for the cosine schedule."""
    onecycle_div_factor: float = 25.0
    """onecycle: the start lr is lr / div_factor."""
    onecycle_final_div_factor: float = 1e4
    """onecycle: the final lr is start lr / final_div_factor."""


@dataclass
class ParallelSection:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: Literal["bf16", "fp32"] = "bf16"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; 'auto' is nccl on GPUs and gloo on CPU."""
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = False
    """ZeRO-2/3 communication overlap; worth it on GPUs, a waste of memory on CPU."""


@dataclass
class CheckpointSection:
    dir: str = ""
    """Where checkpoints go; empty means <run dir>/checkpoints."""
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest k complete checkpoints; older ones are deleted after a new one completes."""
    resume: bool = True
    """Resume automatically from the newest complete checkpoint in ``dir``."""


@dataclass
class ZeroShotEvalSection:
    name: str = "zeroshot"
    """Metric prefix: figures appear as <name>_top1, <name>_top5, <name>_mean_per_class."""
    data: str = ""
    """Directory of held-out shards (a Streaming dataset with image and label columns)."""
    classes: str = ""
    """JSON file with ``classnames`` and ``templates`` (``{c}`` marks the class name)."""
    every_steps: int = 0
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    batch_size: int = 256


@dataclass
class EvalSection:
    zeroshot: list[ZeroShotEvalSection] = field(default_factory=list)
    at_end: bool = True
    """Run every evaluation once more after the last step."""


@dataclass
class LoggingSection:
    every_steps: int = 10
    """A readable summary line (and the TensorBoard scalars) every N steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0 (on stderr)."""
    peak_flops_per_device: float = 0.0
    """Peak dense FLOP/s of one device for the MFU estimate; 0 picks a known value or disables MFU."""


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
    demo_data: str = ""
    """Directory of the embedded digits data set; built (once, by local rank 0) when missing."""
    source: str = ""
    """The recipe file this was loaded from (informational, set by the loader)."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: invalid YAML: {err}") from None
    if data is None:
        return {}
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
    _merge(tree, data, origin, f"recipe {path}")
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


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load ``path`` (following ``base:``), apply ``key.sub=value`` overrides, check every type."""
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
    return build_dataclass(Recipe, tree, origin, f"recipe {Path(path)}")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe (every field, defaults included) as YAML."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_plain(recipe), sort_keys=False))
    tmp.replace(path)

