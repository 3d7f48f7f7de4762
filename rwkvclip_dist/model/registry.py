"""The architecture registry: one small JSON file per model in ``rwkvclip_dist/configs/models``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rwkvclip_dist.model.config import ConfigError, ModelConfig, apply_overrides, config_from_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def list_models() -> list[str]:
    """Names of the registered architectures, e.g. 'tiny', 'RWKV-CLIP-B-32'."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of a registered model (or of a JSON file path), with optional overrides.

    Overrides take nested dicts (``image={"depth": 2}``) or dotted keys passed as a dict
    (``**{"image.depth": 2}``).
    """
    path = Path(name)
    if path.suffix != ".json" or not path.is_file():
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    with path.open() as handle:
        data = json.load(handle)
    config = config_from_dict(data, str(path))
    config.name = path.stem
    if overrides:
        config = apply_overrides(config, overrides, f"{path} (overrides)")
        config.name = path.stem
    return config


def create_model(name: str | ModelConfig, **overrides: Any):
    """A fresh RWKV-CLIP model to train (train mode, SPEC section 7 init) from a registered name or a
    config object; ``overrides`` apply to either. Loading trained weights: ``rwkvclip_dist.load_model``."""
    from rwkvclip_dist.model.clip import RWKVCLIP

    if isinstance(name, ModelConfig):
        config = apply_overrides(name, overrides, f"model config {name.name!r} (overrides)") if overrides else name
        config.name = name.name
    else:
        config = get_model_config(name, **overrides)
    return RWKVCLIP(config)
