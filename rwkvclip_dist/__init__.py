"""rwkvclip_dist: distributed training of RWKV-CLIP.

Public API::

    rwkvclip_dist.list_models()
    rwkvclip_dist.create_model(name, **overrides)
    rwkvclip_dist.create_model_and_transforms(name, pretrained=PATH)   # -> (model, train_tf, eval_tf)
    rwkvclip_dist.get_tokenizer(name)
    rwkvclip_dist.load_checkpoint(model, path)
"""
from rwkvclip_dist.model import create_model, get_model_config, list_models

__version__ = "0.1.0"
__all__ = ["list_models", "create_model", "get_model_config", "create_model_and_transforms", "get_tokenizer",
           "load_checkpoint"]

_PRETRAINED_API = ("create_model_and_transforms", "get_tokenizer", "load_checkpoint")


def __getattr__(name):
    # The inference API pulls in the data transforms and safetensors; import it only when asked for.
    if name in _PRETRAINED_API:
        from rwkvclip_dist import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'rwkvclip_dist' has no attribute {name!r}")
