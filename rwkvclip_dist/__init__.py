"""rwkvclip_dist: distributed training of RWKV-CLIP.

Public API::

    rwkvclip_dist.list_models()
    rwkvclip_dist.create_model(name, **overrides)                      # fresh model to train (train mode)
    rwkvclip_dist.load_model(name_or_None, pretrained=PATH)           # trained weights (eval mode)
    rwkvclip_dist.create_model_and_transforms(name, pretrained=PATH)   # -> (model, train_tf, eval_tf)
    rwkvclip_dist.get_tokenizer(name)
    rwkvclip_dist.load_checkpoint(model, path)
    rwkvclip_dist.save_pretrained(model, path)                         # .safetensors + .json config

Names are imported on first use, so tools that never touch a model (the shard builder, the
description generator) start without importing torch.
"""
__version__ = "0.1.0"

_LAZY = {
    "list_models": "rwkvclip_dist.model.registry",
    "create_model": "rwkvclip_dist.model.registry",
    "get_model_config": "rwkvclip_dist.model.registry",
    "load_model": "rwkvclip_dist.pretrained",
    "save_pretrained": "rwkvclip_dist.pretrained",
    "create_model_and_transforms": "rwkvclip_dist.pretrained",
    "get_tokenizer": "rwkvclip_dist.pretrained",
    "load_checkpoint": "rwkvclip_dist.pretrained",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkvclip_dist' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
