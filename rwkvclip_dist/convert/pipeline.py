"""The three conversions behind ``tools/convert_checkpoint.py`` and the ``--verify`` check.

- authors' released state dict -> ours (:func:`authors_to_ours`);
- DeepSpeed ZeRO directory -> ours (:func:`zero_to_ours`);
- ours -> authors' layout (:func:`ours_to_authors`).
Every path checks the complete key set and shapes against the target model before writing anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rwkvclip_dist.convert import authors as layout
from rwkvclip_dist.pretrained_format import (
    StateDictMismatch,
    check_state_dict,
    config_record,
    mismatch_message,
    state_dict_problems,
    load_state_dict_file,
    read_config,
    save_safetensors,
)
from rwkvclip_dist.convert.reference_forward import authors_encode_image, authors_encode_text
from rwkvclip_dist.model.clip import RWKVCLIP
from rwkvclip_dist.model.config import ModelConfig
from rwkvclip_dist.model.registry import get_model_config, list_models
from rwkvclip_dist.parallel.tensor_parallel import split_dims
from rwkvclip_dist.pretrained import load_model

log = logging.getLogger(__name__)
VERIFY_CAPTIONS = ["a photo of a cat sitting on a red sofa", "a diagram of an electronic circuit"]


@dataclass
class VerifyReport:
    image_cosine: float
    """Smallest cosine, over the fixed batch, between the two sides' image embeddings."""
    text_cosine: float
    """Smallest cosine between the two sides' text embeddings."""
    image_max_abs: float
    text_max_abs: float

    def line(self) -> str:
        return (f"verify: image cosine {self.image_cosine:.8f} (max |diff| {self.image_max_abs:.2e}), "
                f"text cosine {self.text_cosine:.8f} (max |diff| {self.text_max_abs:.2e})")


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Parameter shapes of a model with ``config``, without allocating or initialising it."""
    with torch.device("meta"):
        model = RWKVCLIP(config, initialize=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def _match_config(state: dict[str, torch.Tensor], name: str | None, overrides: dict[str, Any], source: str) -> ModelConfig:
    """The given config, or the one registry config whose shapes the state dict matches exactly."""
    if name is not None:
        config = get_model_config(name, **overrides)
        check_state_dict(expected_shapes(config), state, source)
        return config
    scored = []
    for candidate in list_models():
        config = get_model_config(candidate, **overrides)
        problems = state_dict_problems(expected_shapes(config), state)
        if not any(problems.values()):
            return config
        scored.append((sum(map(len, problems.values())), candidate, problems))
    _, closest, problems = min(scored)
    raise StateDictMismatch(f"no registered model matches; closest is {closest!r}:\n{mismatch_message(problems, source)}")


def _dtype_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def authors_to_ours(src: str | Path, dst: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32,
                    overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Converts an authors' ``model_31.pt`` (or .safetensors) and writes ``dst``; returns the
    config and the authors' state dict (for :func:`verify_authors`)."""
    theirs = load_state_dict_file(src)
    image_depth, text_depth = layout.infer_depths(theirs)
    ours = layout.from_authors(theirs, image_depth, text_depth)
    config = _match_config(ours, name, overrides or {}, f"{src} (keys shown in rwkvclip_dist naming)")
    save_safetensors(_dtype_state(ours, dtype), dst, config_record(config, "clip", dtype))
    return config, theirs


def zero_to_ours(checkpoint_dir: str | Path, dst: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32,
                 overrides: dict[str, Any] | None = None, tag: str | None = None,
                 ema: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Consolidates a ZeRO checkpoint into ``dst``; returns the config and the fp32 state dict.
    The shards of a tensor-parallel run are merged into the plain model's weights.

    A checkpoint of this project's trainer records its recipe, so the file gets the architecture that
    was trained (the model name and its overrides); ``name`` and ``overrides``, if given, must agree
    with it. Other ZeRO checkpoints take ``name`` or the registered model their shapes match."""
    from rwkvclip_dist.convert.zero import load_zero_checkpoint, trained_model

    checkpoint_dir = checkpoint_folder(Path(checkpoint_dir))
    trained = trained_model(checkpoint_dir, tag)
    if trained is not None:
        given = (name or trained[0], overrides if overrides else trained[1])
        if given != trained:
            raise ValueError(f"{checkpoint_dir}: the run trained {trained[0]!r} with overrides {trained[1]}, "
                             f"not {given[0]!r} with {given[1]}; leave out --model/--overrides")
        name, overrides = trained
    dims = None
    if name is not None:
        with torch.device("meta"):
            dims = split_dims(RWKVCLIP(get_model_config(name, **(overrides or {})), initialize=False))
    state = load_zero_checkpoint(checkpoint_dir, tag, dims, ema=ema)
    config = _match_config(state, name, overrides or {}, str(checkpoint_dir))
    save_safetensors(_dtype_state(state, dtype), dst, config_record(config, "clip", dtype))
    return config, state


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder of ``path``: itself, or the ``checkpoints/`` folder of a run directory
    (the trainer's default place for them); a run directory whose checkpoints are elsewhere says so."""
    if (path / "latest").exists() or not (path / "recipe.yaml").is_file():
        return path
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints"
    raise FileNotFoundError(f"{path} is a run directory without checkpoints/latest; pass the folder its recipe's "
                            f"checkpoint.dir names")


def ours_to_authors(src: str | Path, dst: str | Path, released_dtypes: bool = False,
                    accept_loss: bool = False) -> dict[str, torch.Tensor]:
    """Writes our pretrained file in the authors' layout as a plain tensor dict (``torch.save``).
    A model with settings the layout cannot carry (:func:`authors.unrepresentable`) is refused unless
    ``accept_loss``: their code would run it with its own fixed values and compute something else."""
    config = read_config(src)
    lost = layout.unrepresentable(config)
    if lost and not accept_loss:
        settings = ", ".join(f"{k}={v!r}" for k, v in lost.items())
        raise ValueError(f"{src}: the authors' layout cannot represent {settings} (their code fixes "
                         f"{', '.join(f'{k}={layout.AUTHORS_FIXED[k]!r}' for k in lost)}), so the converted file "
                         f"would compute other embeddings; pass --accept-loss to write it anyway")
    if lost:
        log.warning("%s: the authors' layout drops %s; from-authors of the converted file cannot bring them back "
                    "(give --overrides '%s' to it)", src, lost, json.dumps(lost, allow_nan=False))
    state = load_state_dict_file(src)
    check_state_dict(expected_shapes(config), state, str(src))
    theirs = layout.to_authors(state, config.image.depth, config.text.depth, released_dtypes)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(theirs, str(dst))
    return theirs


def fixed_batch(config: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    from rwkvclip_dist.data.tokenizer import tokenize

    size = config.image.image_size
    images = torch.randn(batch, config.image.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    captions = (VERIFY_CAPTIONS * batch)[:batch]
    return images, tokenize(captions, context_length=config.text.context_length)


def _compare(a_img, b_img, a_txt, b_txt) -> VerifyReport:
    return VerifyReport(
        image_cosine=float(F.cosine_similarity(a_img.double(), b_img.double(), dim=-1).min()),
        text_cosine=float(F.cosine_similarity(a_txt.double(), b_txt.double(), dim=-1).min()),
        image_max_abs=float((a_img.double() - b_img.double()).abs().max()),
        text_max_abs=float((a_txt.double() - b_txt.double()).abs().max()),
    )


def _ours(path: str | Path) -> tuple[RWKVCLIP, ModelConfig]:
    model = load_model(None, pretrained=path)
    return model.float(), model.config


@torch.no_grad()
def verify_authors(ours_path: str | Path, theirs: dict[str, torch.Tensor]) -> VerifyReport:
    """Our model loaded from ``ours_path`` vs the direct float64 evaluation of the authors' state dict."""
    model, config = _ours(ours_path)
    images, tokens = fixed_batch(config)
    ref_img = authors_encode_image(theirs, images, config.image.depth, config.image.head_size, config.image.patch_size)
    ref_txt = authors_encode_text(theirs, tokens, config.text.depth, config.text.head_size)
    return _compare(model.encode_image(images), ref_img, model.encode_text(tokens), ref_txt)


def _inputs(config: ModelConfig) -> tuple[int, int, int]:
    return config.image.image_size, config.image.in_channels, config.text.context_length


@torch.no_grad()
def verify_state(ours_path: str | Path, state: dict[str, torch.Tensor], config: ModelConfig) -> VerifyReport:
    """The model loaded from ``ours_path`` (architecture from the file's own config) against a reference
    built independently of that file: ``config`` (for :func:`zero_to_ours`, the architecture the run's
    recipe records) holding ``state`` (the consolidated fp32 ZeRO weights). A file written with the wrong
    architecture, or wrong weights, computes other embeddings and shows here."""
    model, file_config = _ours(ours_path)
    if _inputs(file_config) != _inputs(config):
        raise StateDictMismatch(f"{ours_path}: takes (image size, channels, context length) {_inputs(file_config)}, "
                                f"the trained model {_inputs(config)}")
    reference = RWKVCLIP(config, initialize=False).eval()
    reference.load_state_dict(state, strict=True)
    images, tokens = fixed_batch(config)
    return _compare(model.encode_image(images), reference.encode_image(images),
                    model.encode_text(tokens), reference.encode_text(tokens))
