"""The trainer's reader: MDS column contract, three-text streaming loader, tokenizer, transforms.

The shard builder is the sub-package ``shards`` (tools/make_shards.py); nothing here imports it."""

import importlib

# Resolved on first use: the shard builder (tools/make_shards.py, one process per Slurm task) needs
# none of these (the transforms import torchvision).
_EXPORTS = {"DataConfig": "config", "StreamConfig": "config", "tokenize": "tokenizer",
            "train_transform": "transforms", "eval_transform": "transforms"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
