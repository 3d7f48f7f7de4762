"""The run's record saved with every checkpoint (``client_state.pt``), and whether a run may resume
from it. Only ``checkpoint/`` writes or reads this file; everyone else gets a :class:`RunRecord`.

The file holds plain data (``to_dict``) so it loads with ``weights_only=True``. Checkpoints written
before the record held the model configuration and the versions still load: their ``model`` is
None, and the model is then compared through the recipe's ``model`` section that they did record.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.typed_config import ConfigError

VERSIONED = ("rwkvclip_dist", "torch", "deepspeed", "mosaicml-streaming")


def installed_versions() -> dict[str, str]:
    """Versions of this project and the libraries whose files a checkpoint holds."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class RunRecord:
    step: int
    """Optimizer steps completed when the checkpoint was saved."""
    world_size: int
    """Ranks of the run that saved it (a resume may use another number)."""
    tensor_parallel: int = 1
    """Tensor-parallel size: each TP rank's files hold other slices, so a resume must use the same."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The resolved recipe, as plain data."""
    model: dict[str, Any] | None = None
    """The resolved model configuration (``ModelConfig`` as plain data); None in checkpoints written
    before it was recorded."""
    versions: dict[str, str] = field(default_factory=dict)
    """``installed_versions()`` of the run that saved it (empty in older checkpoints)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "RunRecord":
        if not isinstance(data, dict) or not isinstance(data.get("step"), int):
            raise CheckpointError(f"{where} is not a run record (no step)")
        return cls(step=data["step"], world_size=int(data.get("world_size", 1)),
                   tensor_parallel=int(data.get("tensor_parallel", 1)), recipe=dict(data.get("recipe") or {}),
                   model=data.get("model"), versions=dict(data.get("versions") or {}))

    def model_section(self) -> tuple[str | None, dict[str, Any]]:
        """``(model.name, model.overrides)`` of the recorded recipe (None: not recorded)."""
        section = self.recipe.get("model") or {}
        return section.get("name"), dict(section.get("overrides") or {})


def check_resumable(record: RunRecord, where: str, tensor_parallel: int, model: dict[str, Any],
                    model_name: str, model_overrides: dict[str, Any]) -> None:
    """Refuse, in one line naming both, a resume whose tensor-parallel size or model differs from what
    the checkpoint at ``where`` was written with. ``model``: this run's resolved model configuration;
    ``model_name``/``model_overrides``: its recipe's ``model`` section (what older records hold).
    Both configurations are plain data (``typed_config.to_plain``: lists, not tuples)."""
    start_over = "or start a new run (checkpoint.resume=false or another checkpoint.dir)"
    if record.tensor_parallel != tensor_parallel:
        raise ConfigError(
            f"checkpoint {where} was saved with parallel.tensor_parallel={record.tensor_parallel}, this run has "
            f"{tensor_parallel}: resume with parallel.tensor_parallel={record.tensor_parallel}, {start_over}; "
            f"tools/convert_checkpoint.py from-zero merges its shards into one file of weights")
    if record.model is not None:
        differ = _differences(record.model, model)
    else:
        name, overrides = record.model_section()
        differ = _differences({"name": name, **_flat(overrides)}, {"name": model_name, **_flat(model_overrides)})
    if differ:
        name, overrides = record.model_section()
        raise ConfigError(
            f"checkpoint {where} was trained as model {name!r} with overrides {overrides or '{}'}, this run's "
            f"recipe builds {model_name!r} with overrides {model_overrides or '{}'} (differing: "
            f"{'; '.join(differ)}): resume with the checkpoint's model.name and model.overrides, {start_over}")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    saved, current = _flat(saved), _flat(current)

    def shown(config: dict[str, Any], key: str) -> str:
        return repr(config[key]) if key in config else "(absent)"

    return [f"{key}: checkpoint {shown(saved, key)}, this run {shown(current, key)}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
