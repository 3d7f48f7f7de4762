"""DeepSpeed ZeRO checkpoint directory (any stage, any world size) -> one consolidated state dict.

DeepSpeed's own ``zero_to_fp32`` does the merging of the partitioned fp32 master weights; it
unpickles with ``weights_only=False``. We run it with ``torch.load`` forced to ``weights_only=True``
and allow-list only the few plain DeepSpeed types its files hold, so a checkpoint directory can
never execute code while it is read.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from rwkvclip_dist.checkpoint.safe_load import deepspeed_safe_globals
from rwkvclip_dist.pretrained_format import strip_prefixes


@contextlib.contextmanager
def _weights_only_loads():
    original = torch.load

    @functools.wraps(original)
    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def load_zero_checkpoint(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO 1/2/3 checkpoint directory (``latest`` tag by default)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {checkpoint_dir} does not exist")
    if tag is None and not (checkpoint_dir / "latest").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file; pass the tag (e.g. step_00000400)")
    with _weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    state = strip_prefixes({k: v.float() for k, v in state.items()})
    # The trainer hands DeepSpeed 0-dim parameters as shape [1] (rwkvclip_dist/parallel/engine.py).
    if "logit_scale" in state and state["logit_scale"].shape == (1,):
        state["logit_scale"] = state["logit_scale"].reshape(())
    return state


def trained_model(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[str, dict] | None:
    """``(registry name, overrides)`` of the model a run of this project trained, read from the
    recipe its checkpoint records; None for a checkpoint another program wrote."""
    from rwkvclip_dist.checkpoint.manager import CLIENT_FILE

    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        latest = checkpoint_dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else None
    record_file = checkpoint_dir / str(tag) / CLIENT_FILE
    if tag is None or not record_file.is_file():
        return None
    record = torch.load(record_file, map_location="cpu", weights_only=True)
    model = (record.get("recipe") or {}).get("model") if isinstance(record, dict) else None
    if not isinstance(model, dict) or "name" not in model:
        return None
    return model["name"], dict(model.get("overrides") or {})
