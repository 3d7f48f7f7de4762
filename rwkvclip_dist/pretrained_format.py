"""The pretrained file format: safetensors plus a JSON config; reading, writing, dtypes, and safe
reading of torch state-dict pickles. ``rwkvclip_dist.pretrained`` (the inference API) and
``rwkvclip_dist.convert`` (the checkpoint converters) both build on this module.

A pretrained model is ``NAME.safetensors`` with ``NAME.json`` beside it; the JSON names the registry
config and the overrides that turn it into the saved architecture, so the file stays readable and
diffable. The same JSON is also embedded in the safetensors metadata (key ``rwkvclip_config``) so a
lone ``.safetensors`` file still loads. Torch pickles are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rwkvclip_dist.model.config import ModelConfig, apply_overrides, config_from_dict
from rwkvclip_dist.model.registry import get_model_config, list_models

FORMAT = "rwkvclip_dist"
METADATA_KEY = "rwkvclip_config"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class StateDictMismatch(ValueError):
    """A state dict does not match the model it is meant for; nothing was loaded."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def config_overrides(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """``(registry name, dotted overrides)`` that rebuild ``config`` from the registry."""
    name = config.name
    base, target = get_model_config(name).to_dict(), config.to_dict()
    overrides: dict[str, Any] = {}
    for section in ("image", "text"):
        for key, value in target.pop(section).items():
            if base[section][key] != value:
                overrides[f"{section}.{key}"] = value
        base.pop(section)
    for key, value in target.items():
        if key != "name" and base[key] != value:
            overrides[key] = value
    return name, overrides


def config_record(config: ModelConfig, kind: str = "clip", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The JSON record of a pretrained file: registry name + overrides, or the full config when the
    architecture is not in the registry."""
    if config.name not in list_models():
        return {"format": FORMAT, "kind": kind, "model": None, "config": config.to_dict(),
                "dtype": str(dtype).removeprefix("torch.")}
    name, overrides = config_overrides(config)
    return {"format": FORMAT, "kind": kind, "model": name, "overrides": overrides,
            "dtype": str(dtype).removeprefix("torch.")}


def config_from_record(record: dict[str, Any], source: str) -> ModelConfig:
    if record.get("format") != FORMAT or "model" not in record:
        raise ValueError(f"{source}: not an {FORMAT} config (needs 'format': '{FORMAT}' and 'model')")
    if record["model"] is None:
        if not isinstance(record.get("config"), dict):
            raise ValueError(f"{source}: 'model' is null but there is no 'config' mapping")
        return config_from_dict(record["config"], source)
    config = get_model_config(record["model"])
    overrides = record.get("overrides") or {}
    if overrides:
        config = apply_overrides(config, overrides, f"{source}: overrides")
        config.name = record["model"]
    return config


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, record: dict[str, Any]) -> Path:
    """Writes ``path`` (.safetensors) and its JSON sidecar; tensors are made contiguous and unshared."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a pretrained file must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(record, allow_nan=False)})
    path.with_suffix(".json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return path


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``; a truncated, corrupt or code-carrying file is a
    ValueError naming the file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt, or it holds more than "
                         f"tensors and plain containers): {_first_line(err)}") from None


@contextlib.contextmanager
def _readable_safetensors(path: Path):
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {err}") from None


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON config of a pretrained file: the sidecar if present, else the embedded metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained file {path} does not exist")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return _json(sidecar.read_text(), sidecar)
    if path.suffix == ".safetensors":
        with _readable_safetensors(path), safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if METADATA_KEY in metadata:
            return _json(metadata[METADATA_KEY], f"{path} (metadata {METADATA_KEY!r})")
    raise FileNotFoundError(f"{path}: no config found (neither {sidecar.name} nor embedded '{METADATA_KEY}' metadata)")


def _json(text: str, source: str | Path) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: invalid JSON: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    return record


def read_config(path: str | Path) -> ModelConfig:
    return config_from_record(read_record(path), str(path))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch state-dict pickle (``weights_only=True``).

    A pickle holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and ``module.`` /
    ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        with _readable_safetensors(path):
            state = load_file(str(path))
    else:
        state = read_torch_file(path)
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return strip_prefixes(state)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def state_dict_problems(expected: dict[str, torch.Size], given: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Missing, unexpected and mis-shaped keys of ``given`` against ``expected`` shapes."""
    return {
        "missing": sorted(set(expected) - set(given)),
        "unexpected": sorted(set(given) - set(expected)),
        "mis-shaped": sorted(
            f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k])}"
            for k in set(expected) & set(given)
            if tuple(given[k].shape) != tuple(expected[k])
        ),
    }


def check_state_dict(expected: dict[str, torch.Size], given: dict[str, torch.Tensor], source: str) -> None:
    """Raises :class:`StateDictMismatch` listing every missing, unexpected and mis-shaped key."""
    problems = state_dict_problems(expected, given)
    if any(problems.values()):
        raise StateDictMismatch(mismatch_message(problems, source))


def mismatch_message(problems: dict[str, list[str]], source: str) -> str:
    lines = [f"{source} does not match the model; nothing was loaded."]
    for title, items in problems.items():
        if items:
            lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    return "\n".join(lines)
