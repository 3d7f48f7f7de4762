"""Reading checkpoint files without ever running code from them.

A torch file is a pickle, and unpickling with ``weights_only=False`` (what DeepSpeed's own
``TorchCheckpointEngine.load`` does for its ``*_model_states.pt`` / ``*_optim_states.pt``) calls
whatever the file names: a crafted checkpoint runs arbitrary code on every rank that resumes from it.
Here every file is read with ``weights_only=True``: tensors, plain containers and the few plain
DeepSpeed types its files hold (an int enum and the loss-scaler's attribute bag). Anything else is
refused with an error that names the file and the foreign object.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.parallel.deepspeed_compat import checkpoint_classes, replace_checkpoint_loader


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects beyond tensors and plain containers."""


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files legitimately hold; none runs code when rebuilt."""
    return checkpoint_classes()


@contextlib.contextmanager
def deepspeed_types_allowed():
    """Weights-only loads inside the block accept :func:`deepspeed_safe_globals`. Only the classes not
    allowed already are added, and removed on exit: torch's ``safe_globals`` removes its whole list on
    exit, so a nested block with the same list would disallow them for the rest of the outer block."""
    present = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([c for c in deepspeed_safe_globals() if c not in present]):
        yield


def load_weights_only(path: str | Path | BinaryIO, map_location: Any = "cpu", name: str | None = None) -> Any:
    """``torch.load`` restricted to data; :class:`UnsafeCheckpointError` names anything else (``name``:
    what to call a file object in that message)."""
    try:
        with deepspeed_types_allowed():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # Not torch's advice to allow-list the global: that is exactly what must not happen here.
        found = re.search(r"GLOBAL (\S+)", str(err))
        detail = f"it names {found.group(1)}" if found else "it is not a plain torch file"
        raise UnsafeCheckpointError(
            f"checkpoint file {name or path} was refused: {detail}, beyond tensors and plain data; loading it could "
            f"run code. Delete it or restore it from a trusted copy") from None


def make_engine_loads_safe(engine) -> None:
    """Route every file DeepSpeed's engine reads (model, optimizer and ZeRO shards) through
    :func:`load_weights_only` instead of its ``torch.load(..., weights_only=False)``."""

    def load(path: str, map_location=None):
        return load_weights_only(path, map_location)

    replace_checkpoint_loader(engine, load)
